"""``normlab norms``: the registered normalization variants, their properties and options."""

from __future__ import annotations

import argparse
import inspect

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
    # not a layer: a preconditioner of the gradients, chosen by optim.precondition (with model.norm=none)
    defaults = inspect.signature(normlayers.BNPreconditioner).parameters
    options = ", ".join(f"optim.bnp_{k}={defaults[k].default!r}" for k in ("momentum", "eps", "skip"))
    print(f"{'bnp':12s} {normlayers.bnp.DESCRIPTION}  [optim.precondition=bnp]")
    print(f"{'':12s}   options: {options}")
    return 0
