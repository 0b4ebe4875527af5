"""``normlab train [EXPERIMENT.yaml] [key=value ...]``: one tracked, resumable run.

Without an experiment file it trains the embedded default (configs/experiments/digits_resnet20.yaml:
ResNet-20 with bn on scikit-learn's digits, about a minute on two CPU cores). Re-running the same
command resumes an interrupted run from its checkpoint, into the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys

USAGE = "usage: normlab train [EXPERIMENT.yaml] [key=value ...]"
HELP = """Trains one run: the schema defaults (= configs/experiments/digits_resnet20.yaml), then the
experiment YAML, then key=value overrides (OmegaConf dot-list, e.g. model.norm=gn:groups=8).
The run directory is <output.root>/<run_key>; the same command again resumes from its
checkpoint into the same MLflow run, or reports the run as already finished."""


def _one_line(error: Exception) -> str:
    # A DataLoader worker re-raises with the worker's traceback folded into the message; the cause is its last line.
    last = str(error).strip().splitlines()[-1]
    return last.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")


def _parser(keys_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab train", usage=USAGE.removeprefix("usage: "), description=HELP,
                                     epilog=f"keys (key=default  meaning):\n{keys_help}", add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this help, every key with its default")
    parser.add_argument("words", nargs="*", metavar="EXPERIMENT.yaml | key=value",
                        help="an optional experiment file, then OmegaConf dot-list overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from trainer import tracking
    from trainer.config import ConfigError, help_text, load_config

    parser = _parser(help_text())
    args, unexpected = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return 0
    experiment, overrides = None, []
    for arg in args.words:
        if "=" in arg:
            overrides.append(arg)
        elif experiment is None:
            experiment = arg
        else:
            unexpected.append(arg)
    if unexpected:
        print(f"normlab train: unexpected argument {unexpected[0]!r}; {USAGE}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(experiment, overrides)
        # the server is asked before torch and Lightning load (seconds): one line at once when it is down
        down = tracking.unreachable(tracking.resolve_uri(cfg.tracking.uri))
        if down:
            raise ConfigError(f"tracking.uri: {down}")
        from trainer.run import describe, train

        result = train(cfg)
    except ConfigError as e:
        print(f"normlab train: {_one_line(e)}", file=sys.stderr)
        return 2
    if result.run_id is not None:
        print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
