"""``normlab norms``: the registered normalization variants, their properties and options."""

from __future__ import annotations

import argparse

import normlayers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="normlab norms", description=__doc__)
    parser.parse_args(argv)
    for info in normlayers.available().values():
        flags = [f for f, on in (("batch", info.batch_dependent), ("act", info.includes_activation)) if on]
        print(f"{info}{'  (' + ', '.join(flags) + ')' if flags else ''}")
    return 0
