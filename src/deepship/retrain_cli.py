"""`deepship retrain` on the command line: argparse only at import (the CLI imports it for every command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_retrain_parser(commands: Any) -> None:
    p = commands.add_parser("retrain", help="labeled production data -> challenger trained, exported, registered; "
                                            "promoted by the registry's gate (exit 0), refused (exit 4)")
    p.add_argument("--champion", default=None, metavar="registry:NAME@ALIAS",
                   help="the version to beat, e.g. registry:sentiment@production")
    p.add_argument("--champion-package", type=Path, default=None,
                   help="or a package; registered as NAME@production when the registry has no production yet")
    p.add_argument("--champion-run", type=Path, default=None,
                   help="the champion's run directory, whose config.yaml to retrain with (default: the package's)")
    p.add_argument("--name", default=None, help="with --champion-package: the registry name")
    p.add_argument("--registry", default=None, help="registry directory or URI (default: $DEEPSHIP_REGISTRY or ./registry)")
    p.add_argument("--log", type=Path, required=True, help="prediction log: serve --log or predict --output JSONL")
    p.add_argument("--labels", type=Path, required=True, help="CSV/JSONL with id,label for logged predictions")
    p.add_argument("--inputs", type=Path, default=None,
                   help="the file the logged predictions were made on, when the log keeps no raw inputs")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="FILE",
                   help="more labeled training data, any format training reads")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of the labeled inputs, the most recent by ts, held out as the decision set (0.2)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override the champion's config for the challenger, e.g. --set train.max_epochs=2")
    p.add_argument("--lock-timeout", type=float, default=60.0,
                   help="seconds to wait for the registry lock before register/promote; then exit 1 (default 60)")
    p.add_argument("--out", type=Path, required=True, help="work directory; rerun with the same to resume")
    p.set_defaults(func=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    from deepship.retrain import RetrainOptions, run_retrain
    from deepship.retrain_report import HTML_NAME, JSON_NAME

    options = RetrainOptions(out=args.out, log=args.log, labels=args.labels, champion=args.champion,
                             champion_package=args.champion_package, champion_run=args.champion_run, name=args.name,
                             registry=args.registry, inputs=args.inputs, data=args.data, holdout=args.holdout,
                             overrides=args.set, lock_timeout=args.lock_timeout)
    code, report = run_retrain(options)
    d, c = report["decision"], report["challenger"]
    print(f"{'promoted' if d['promoted'] else 'refused'}: {c['name']}:{c['version']} -- {d['reason']}",
          file=sys.stderr)
    print(f"report: {args.out / JSON_NAME} and {args.out / HTML_NAME}")
    return code
