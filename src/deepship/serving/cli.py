"""`deepship serve`: argument parsing and the uvicorn launch.

Importing this module is cheap (argparse only): `deepship.cli` builds its parser from `add_serve_parser`;
FastAPI and uvicorn load when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deepship.errors import ConfigError


# ------------------------------------------------------------------------------------- serve
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve a model package over HTTP (no torch needed)")
    model = serve.add_mutually_exclusive_group(required=True)
    model.add_argument("--package", help="model package folder written by export")
    model.add_argument("--model", metavar="registry:NAME@ALIAS",
                       help="a registered model: registry:NAME@ALIAS follows the alias as it moves "
                            "(registry:NAME:VERSION serves one version); needs --registry")
    serve.add_argument("--registry", default=None, metavar="DIR|URI",
                       help="the model registry of --model (default: $DEEPSHIP_REGISTRY, else ./registry)")
    serve.add_argument("--watch-interval", type=float, default=None, metavar="SECONDS",
                       help="--model NAME@ALIAS: seconds between reads of the alias (default 2)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes, each with its own model copy (default 1; SIGHUP then restarts them)")
    serve.add_argument("--settings", default=None, help="YAML file of serve settings (docs/serving.md)")
    serve.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override a serve setting, e.g. --set max_wait_ms=2 max_items=16")
    serve.add_argument("--no-batching", action="store_true", help="one model call per request (batching=false)")
    serve.add_argument("--max-batch-size", type=int, default=None, help="inputs per model call (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=None,
                       help="extra batching window (default 0: a batch is what queued up while the model ran)")
    serve.add_argument("--log", default=None, metavar="PATH", help="prediction log, JSON lines (default: none)")
    serve.add_argument("--log-inputs", action="store_true", help="also log raw inputs (off by default: privacy)")
    serve.add_argument("--admin", action="store_true", help="enable POST /admin/reload and /admin/rollback")
    serve.add_argument("--no-access-log", action="store_true", help="no per-request access log lines")
    serve.set_defaults(func=cmd_serve)
    return serve


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags as `--set` pairs, applied last (flags beat --set, which beats --settings)."""
    pairs = []
    if args.no_batching:
        pairs.append("batching=false")
    if args.max_batch_size is not None:
        pairs.append(f"max_batch_size={args.max_batch_size}")
    if args.max_wait_ms is not None:
        pairs.append(f"max_wait_ms={float(args.max_wait_ms)}")
    if args.log is not None:
        pairs.append(f"log_path={json.dumps(args.log)}")  # quoted: a path is a string even if it looks like a number
    if args.log_inputs:
        pairs.append("log_inputs=true")
    if args.admin:
        pairs.append("admin=true")
    if args.watch_interval is not None:
        pairs.append(f"watch_interval_s={float(args.watch_interval)}")
    return pairs


def served_model(args: argparse.Namespace) -> Any:
    """The package folder, or the registry reference resolved once now: a bad one fails here with one clear line
    (exit 2), not in a worker's traceback."""
    from deepship.runtime.predictor import Predictor

    if args.model is None:
        if args.registry is not None:
            raise ConfigError("--registry goes with --model registry:NAME@ALIAS, not with --package")
        Predictor.load(args.package)
        return args.package
    from deepship.registry import open_registry
    from deepship.serving.alias import parse_model_option, resolve_model

    model = parse_model_option(args.model, args.registry, args.host, args.port)
    path, _ = resolve_model(open_registry(model.registry), model)
    Predictor.load(path)
    return model


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from deepship.serving.settings import load_settings

    settings = load_settings(args.settings, [*args.set, *flag_overrides(args)])
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    model = served_model(args)
    import uvicorn

    options = {"host": args.host, "port": args.port, "access_log": not args.no_access_log,
               "timeout_graceful_shutdown": int(settings.graceful_timeout_s) or 1}
    if args.workers == 1:
        from deepship.serving.app import create_app

        uvicorn.run(create_app(model, settings), **options)
        return 0
    # Several processes: uvicorn imports the app in each from a factory; the settings travel in the environment.
    os.environ.update({"DEEPSHIP_SERVE_SETTINGS": settings.model_dump_json(), "DEEPSHIP_SERVE_WORKERS": str(args.workers)})
    if args.package:
        os.environ["DEEPSHIP_SERVE_PACKAGE"] = str(Path(args.package).resolve())
    else:  # each worker follows the alias on its own and logs its own deploy events (its pid tells them apart)
        os.environ["DEEPSHIP_SERVE_REGISTRY_MODEL"] = json.dumps(asdict(model))
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # each worker writes its metrics there
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="deepship-metrics-")
    try:
        uvicorn.run("deepship.serving.app:create_app_from_env", factory=True, workers=args.workers, **options)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
    return 0
