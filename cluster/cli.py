"""The ``normlab`` command: one subcommand per module, each owning its own arguments."""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainer.cli", "train one run: normlab train [EXPERIMENT.yaml] [key=value ...]"),
    "sweep": ("cluster.sweep_cli", "plan, submit, watch or cancel a sweep: sweep {plan,submit,status,cancel} FILE"),
    "report": ("cluster.report", "regime figures from a sweep or experiment: normlab report SWEEP_OR_EXPERIMENT"),
    "demo": ("cluster.demo", "the demo sweep on this machine, then its report (what `make demo` runs)"),
    "norms": ("cluster.norms_cli", "list the normalization variants and their options"),
}


def _usage() -> str:
    lines = ["usage: normlab COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:8s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`normlab COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"normlab: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"normlab {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `normlab norms | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
