"""`deepship <command>`: argument parsing and the mapping of errors to exit codes.

Exit codes (DESIGN.md section 3): 0 ok; 2 bad usage, config or input; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from deepship.errors import DeepshipError


def cmd_train(args: argparse.Namespace) -> int:
    from deepship.config import load_config

    cfg = load_config(args.config, args.set)  # exit 2 before anything heavy is imported
    from deepship.training import fit  # torch, lightning: imported only once the config is good

    run_dir = fit(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics["val"].items())
    print(f"run directory: {run_dir}")
    print(f"val: {summary}")
    if "test" in metrics:
        print("test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics["test"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepship", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a classifier from a YAML config")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart_text.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])  # usage errors exit 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DeepshipError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
