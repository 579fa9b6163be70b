"""`deepship registry ...`: argument parsing and printing; the registry modules do the work.

Importing this module is cheap (argparse only): the registry loads when a command runs, and the
evaluation layer (torch) only for `promote`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deepship.errors import ConfigError

EXIT_GATE_FAILED = 4  # the exit-code contract's "a gate failed" (deepship.cli cannot be imported from here)


def add_registry_parser(subparsers: Any) -> argparse.ArgumentParser:
    registry = subparsers.add_parser("registry", help="model registry: versions, aliases, gated promotion, lineage")
    commands = registry.add_subparsers(dest="registry_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", default=None, metavar="DIR|URI",
                       help="a directory, file:DIR, or mlflow+<tracking uri> (default: $DEEPSHIP_REGISTRY, else ./registry)")

    register = commands.add_parser("register", parents=[where], help="copy and verify a package as a new version")
    register.add_argument("package", help="model package folder written by export")
    register.add_argument("--name", required=True, help="model name, e.g. sentiment")
    register.add_argument("--alias", default=None, help="point this alias at the new version, e.g. challenger")
    register.set_defaults(func=cmd_register)

    listing = commands.add_parser("list", parents=[where], help="models, or one model's versions")
    listing.add_argument("name", nargs="?", default=None, help="a model: list its versions")
    listing.set_defaults(func=cmd_list)

    show = commands.add_parser("show", parents=[where], help="one version (verified): NAME, NAME@ALIAS or NAME:VERSION")
    show.add_argument("ref")
    show.set_defaults(func=cmd_show)

    alias = commands.add_parser("alias", parents=[where], help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    alias.set_defaults(func=cmd_alias)

    promote = commands.add_parser("promote", parents=[where],
                                  help="move --to to the --from version if it passes the gate (exit 4 when refused)")
    promote.add_argument("name")
    promote.add_argument("--from", dest="from_alias", default="challenger", help="candidate alias (default challenger)")
    promote.add_argument("--to", dest="to_alias", default="production", help="alias to move (default production)")
    promote.add_argument("--data", default=None,
                         help="labeled data both versions are scored on (default: the candidate's configured test set)")
    promote.add_argument("--max-regression", type=float, default=0.0,
                         help="refuse unless the 95%% lower bound of candidate - current exceeds -this (default 0.0)")
    promote.add_argument("--force", action="store_true", help="promote even when the gate refuses; logged as forced")
    promote.add_argument("--set", nargs="+", action="extend", default=[], metavar="objective.KEY=VALUE",
                         help="override the candidate's objective, e.g. --set objective.min=0.9")
    promote.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    promote.add_argument("--latency-runs", type=int, default=100, help="timed batch-1 calls of the candidate")
    promote.set_defaults(func=cmd_promote)

    rollback = commands.add_parser("rollback", parents=[where],
                                   help="point an alias back at its previous target; again walks further back")
    rollback.add_argument("name")
    rollback.add_argument("alias", nargs="?", default="production")
    rollback.set_defaults(func=cmd_rollback)

    lineage = commands.add_parser("lineage", parents=[where],
                                  help="data -> config -> run -> package -> version -> aliases -> servers, as JSON")
    lineage.add_argument("ref", help="NAME@ALIAS, NAME:VERSION or NAME")
    lineage.add_argument("--out", default=None, help="also write the JSON here, e.g. lineage.json")
    lineage.set_defaults(func=cmd_lineage)
    return registry


def open_from(args: argparse.Namespace):  # -> Registry
    from deepship.registry.backends import open_registry

    return open_registry(args.registry)


def cmd_register(args: argparse.Namespace) -> int:
    registry = open_from(args)
    info = registry.register(args.package, args.name, alias=args.alias)
    aliases = f" as {', '.join(info.aliases)}" if info.aliases else ""
    print(f"registered {info.name}:{info.version}{aliases} (sha256 {info.sha256[:12]}) in {registry.uri}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = open_from(args)
    if args.name is None:
        names = registry.models()
        if not names:
            print(f"no models in {registry.uri}")
        for name in names:
            aliases = " ".join(f"{a}={v}" for a, v in sorted(registry.aliases(name).items()))
            print(f"{name}\t{len(registry.versions(name))} versions\t{aliases}")
        return 0
    for info in registry.versions(args.name):
        print(f"{info.name}:{info.version}\t{info.created[:19]}\t{info.lineage.get('model_version') or ''}\t"
              f"{','.join(info.aliases)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    info = open_from(args).resolve(args.ref)
    print(json.dumps({"name": info.name, "version": info.version, "path": str(info.path), "sha256": info.sha256,
                      "created": info.created, "aliases": info.aliases, "lineage": info.lineage}, indent=2))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    registry = open_from(args)
    before = registry.alias_target(args.name, args.alias)
    registry.set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias}: {before} -> {args.version}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from deepship.registry.promote import promote

    if args.max_regression < 0:
        raise ConfigError(f"--max-regression {args.max_regression}: must be 0 or more (a tolerated drop)")
    if args.bootstrap < 1 or args.latency_runs < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap} / --latency-runs {args.latency_runs}: need at least 1 "
                          "resample and 0 (skip) or more timed calls")
    decision = promote(open_from(args), args.name, from_alias=args.from_alias, to_alias=args.to_alias,
                       data=args.data, max_regression=args.max_regression, force=args.force,
                       objective_overrides=args.set, n_resamples=args.bootstrap, latency_runs=args.latency_runs)
    verb = "promoted (forced)" if decision.forced else "promoted" if decision.promoted else "refused"
    print(f"{verb}: {decision.reason}")
    if decision.report_dir:
        print(f"reports: {decision.report_dir}")
    return 0 if decision.promoted else EXIT_GATE_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    from deepship.registry.history import rollback

    before, after = rollback(open_from(args), args.name, args.alias)
    print(f"{args.name}@{args.alias}: {before} -> {after} (rolled back)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from deepship.files import write_json
    from deepship.registry.history import build_lineage

    registry = open_from(args)
    lineage = build_lineage(registry, registry.resolve(args.ref))
    print(json.dumps(lineage, indent=2))
    if args.out:
        write_json(Path(args.out), lineage)
        print(f"lineage: {args.out}", file=sys.stderr)
    return 0
