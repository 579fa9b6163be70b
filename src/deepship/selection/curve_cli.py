"""`deepship learning-curve`: argument parsing (argparse only, cheap to import); the work is in
deepship.selection.learning_curve."""

from __future__ import annotations

import argparse
from typing import Any


def add_learning_curve_parser(commands: Any) -> argparse.ArgumentParser:
    curve = commands.add_parser("learning-curve", help="train on growing shares of the training data; "
                                                       "say whether more data is likely to help")
    curve.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart_text.yaml")
    curve.add_argument("--fractions", default="0.1,0.25,0.5,1.0",
                       help="increasing shares of the training split, comma-separated (default 0.1,0.25,0.5,1.0)")
    curve.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config keys for every run, e.g. --set train.max_epochs=2")
    curve.add_argument("--seeds", type=int, default=1,
                       help="runs per fraction, at train.seed, train.seed+1, ... (default 1)")
    curve.add_argument("--out", default=None,
                       help="folder for runs/ and learning_curve.{json,csv,html} "
                            "(default: <train.out_dir>/<train.run_name>-learning-curve)")
    curve.set_defaults(func=cmd_learning_curve)
    return curve


def cmd_learning_curve(args: argparse.Namespace) -> int:
    from deepship.errors import ConfigError
    from deepship.selection.learning_curve import CurveOptions, learning_curve, parse_fractions

    fractions = parse_fractions(args.fractions)  # exit 2 before anything trains
    if args.seeds < 1:
        raise ConfigError(f"--seeds: {args.seeds} runs per fraction; give 1 or more")
    result = learning_curve(args.config, args.set, CurveOptions(fractions, args.seeds, args.out))
    metric = result["metric"]
    for p in result["points"]:
        print(f"fraction {p['fraction']:g} ({p['n_train']} training samples): train {metric} "
              f"{p['train']['value']:.4f}, val {metric} {p['val']['value']:.4f} (SE {p['val']['se']:.4f})")
    print(result["verdict"]["text"])
    print(f"wrote {result['out']}/learning_curve.html ({result['wall_time_s']} s)")
    return 0
