"""``normlab norms``: the registered normalization variants, their properties and options."""

from __future__ import annotations

import argparse

import normlayers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="normlab norms", description=__doc__)
    parser.parse_args(argv)
    for info in normlayers.available().values():
        flags = [f for f, on in (("batch-dependent", info.batch_dependent),
                                 ("includes activation", info.includes_activation)) if on]
        print(f"{info.name:12s} {info.description}" + (f"  [{', '.join(flags)}]" if flags else ""))
        options = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "no options"
        print(f"{'':12s}   options: {options}")
    return 0
