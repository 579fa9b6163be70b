"""`deepship sweep`: argument parsing for sweeps; the work is in deepship.selection.runner."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from deepship.errors import ConfigError


def add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="hyperparameter sweep (Optuna): trials are ordinary runs; writes a "
                                              "leaderboard and best.json")
    sweep.add_argument("--config", default=None, help="sweep YAML, e.g. configs/sweep_text.yaml")
    sweep.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override a key of the sweep config, e.g. --set sweep.n_trials=20 train.max_epochs=2")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep in sweep.out_dir (n_trials and timeout may change)")
    sweep.add_argument("--best", default=None, metavar="DIR",
                       help="print the winning run directory of the sweep in DIR (nothing else on stdout)")
    sweep.add_argument("--export", default=None, metavar="OUT",
                       help="export the winning run to the package folder OUT (after the sweep, or with --best)")
    sweep.set_defaults(func=cmd_sweep)


def export_winner(run_dir: str, out: str) -> int:
    """The normal export (parity gate included) of the winning run, with export's own defaults."""
    from deepship.export import ExportOptions, export_package

    package = export_package(run_dir, out, ExportOptions())
    parity = json.loads((package / "parity.json").read_text())
    print(f"package: {package} (parity on {parity['num_compared']} inputs: logits max_abs_diff "
          f"{parity['max_abs_diff']:.3g}, top-1 agreement {parity['top1_agreement']:.2%})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from deepship.selection.runner import read_best

    if args.best is not None:
        if args.config is not None or args.resume or args.set:
            raise ConfigError("--best DIR reads a finished sweep; give it without --config, --set or --resume")
        run_dir = read_best(args.best)["run_dir"]
        print(run_dir)
        if args.export is None:
            return 0
        with contextlib.redirect_stdout(sys.stderr):  # stdout stays the run directory alone
            return export_winner(run_dir, args.export)
    if args.config is None:
        raise ConfigError("sweep: give --config SWEEP.yaml to run a sweep, or --best DIR to read a finished one")
    from deepship.selection.config import load_sweep_config

    sweep_cfg = load_sweep_config(args.config, args.set)  # exit 2 before torch is imported
    from deepship.selection.runner import run_sweep

    run_sweep(sweep_cfg, args.resume)
    if args.export is None:
        return 0
    return export_winner(read_best(sweep_cfg.sweep_dir)["run_dir"], args.export)
