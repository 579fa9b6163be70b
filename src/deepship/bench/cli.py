"""`deepship bench <name>` (and `python scripts/bench.py <name>`): the one argument parser of the benchmarks.

Importing this module is cheap (argparse only): each benchmark's module, and torch with most of them, loads
when that benchmark runs. Every benchmark prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from deepship.errors import ConfigError

Rows = list[dict[str, Any]]

HELP = {
    "data": "validation of N text rows vs reading them",
    "finetune": "strategies on rt-polarity (--data DIR) with MiniLM vs TF-IDF",
    "export": "fp32 vs int8 packages of MiniLM on rt-polarity (--data DIR)",
    "serve": "HTTP load test of --package on loopback, batching on vs off (or, with --alias-moves N, "
             "a server following a registry alias that moves N times under load)",
    "monitor": "monitor a 1M-line prediction log of --package",
    "train": "toolkit training step vs a plain PyTorch loop on in-memory tensors",
    "runtime": "batch-1 onnxruntime (--package) vs torch eager (--run) on CPU",
    "pipeline": "text padding schemes on rt-polarity (--data DIR), or image loaders on a JPEG folder",
}


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmarks: one JSON line per measurement, then a table")
    bench.add_argument("what", choices=list(HELP), help="; ".join(f"{k}: {v}" for k, v in HELP.items()))
    bench.add_argument("--rows", type=int, default=None,
                       help="data: rows to generate (default 100000); monitor: log lines (default 1000000)")
    bench.add_argument("--data", default=None, metavar="DIR",
                       help="finetune, export, pipeline text: the rt-polarity folder (rt-polarity.pos/.neg; required); "
                            "pipeline image: a class-per-folder JPEG tree (default: generated under --out)")
    bench.add_argument("--epochs", type=int, default=None, help="finetune/export: epochs (default 2)")
    bench.add_argument("--out", default=None, help="finetune/export/monitor/pipeline: work folder "
                                                   "(default checkpoints/bench-*)")
    bench.add_argument("--train-samples", type=int, default=None, help="export: training sentences (default 2000)")
    bench.add_argument("--runs", type=int, default=None, help="export, runtime: timed runs per model (default 200)")
    bench.add_argument("--variants", default=None, help="finetune: comma-separated subset of full,"
                                                        "freeze_then_unfreeze,layer_decay")
    add_perf_options(bench)
    add_serve_options(bench)
    bench.set_defaults(func=cmd_bench)
    return bench


def add_perf_options(bench: argparse.ArgumentParser) -> None:
    perf = bench.add_argument_group("train (toolkit step vs plain PyTorch), runtime and pipeline")
    perf.add_argument("--modality", choices=["image", "text"], default="image",
                      help="train, pipeline: MobileNetV2 or MiniLM")
    perf.add_argument("--steps", type=int, default=20, help="train: timed steps after 5 warm-up steps (default 20)")
    perf.add_argument("--batch-size", type=int, default=32, help="train: batch size (default 32; GPU anchor: 256)")
    perf.add_argument("--image-size", type=int, default=64, help="train: image size (default 64; GPU anchor: 224)")
    perf.add_argument("--seq-len", type=int, default=64, help="train: text sequence length (default 64)")
    perf.add_argument("--compile", action="store_true", help="train: torch.compile both loops")
    perf.add_argument("--backbone", default="all-MiniLM-L6-v2",
                      help="train, pipeline: the text model (alias or local Hugging Face folder; default all-MiniLM-L6-v2)")
    perf.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="train: device (default auto)")
    perf.add_argument("--run", default=None, help="runtime: the run directory the package was exported from")


def add_serve_options(bench: argparse.ArgumentParser) -> None:
    group = bench.add_argument_group("serve (HTTP load test on loopback)")
    group.add_argument("--package", default=None, help="serve, monitor, runtime: the model package")
    group.add_argument("--concurrency", default="1,4,16,64", help="serve: concurrent clients per level (default 1,4,16,64)")
    group.add_argument("--duration", type=float, default=3.0, help="serve: seconds per level at most (default 3)")
    group.add_argument("--requests", type=int, default=2000, help="serve: requests per level at most (default 2000)")
    group.add_argument("--batching", default="on,off", help="serve: modes to compare (default on,off)")
    group.add_argument("--items", type=int, default=1, help="serve: inputs per request (default 1)")
    group.add_argument("--alias-moves", type=int, default=0, metavar="N",
                       help="serve: instead, serve --package from a temporary registry by alias and move the alias "
                            "N times under load, at the largest --concurrency, --duration seconds apart")


def cmd_bench(args: argparse.Namespace) -> int:
    from deepship.bench.common import print_results

    print_results(RUNNERS[args.what](args))
    return 0


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the rest keep the benchmark function's defaults."""
    return {k: v for k, v in options.items() if v is not None}


def require_package(args: argparse.Namespace) -> str:
    if not args.package:
        raise ConfigError(f"bench {args.what}: --package is required; give a folder written by `deepship export`")
    return args.package


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected comma-separated integers, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text}: expected positive integers, e.g. 1,4,16")
    return values


def check_steps(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError(f"bench {args.what}: --steps and --batch-size must be at least 1")


# ------------------------------------------------------------------------------------ runners
def run_data(args: argparse.Namespace) -> Rows:
    from deepship.bench.data import bench_data

    return bench_data(**given(rows=args.rows))


def run_finetune(args: argparse.Namespace) -> Rows:
    from deepship.bench.finetune import bench_finetune

    return bench_finetune(args.data, **given(out_dir=args.out, epochs=args.epochs, variants=args.variants))


def run_export(args: argparse.Namespace) -> Rows:
    from deepship.bench.export import bench_export

    return bench_export(args.data, **given(out_dir=args.out, epochs=args.epochs, train_samples=args.train_samples,
                                           runs=args.runs))


def run_monitor(args: argparse.Namespace) -> Rows:
    package = require_package(args)
    from deepship.bench.monitor import bench_monitor

    return bench_monitor(package, **given(rows=args.rows, out_dir=args.out))


def run_serve(args: argparse.Namespace) -> Rows:
    package = require_package(args)
    levels = parse_int_list(args.concurrency, "--concurrency")
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise ConfigError(f"--batching {args.batching}: give on, off or on,off")
    if args.duration <= 0 or args.requests < 1 or args.items < 1 or args.alias_moves < 0:
        raise ConfigError("--duration, --requests and --items must be positive (--alias-moves at least 0)")
    if args.alias_moves:
        from deepship.bench.serve_alias import bench_alias_moves

        return bench_alias_moves(package, args.alias_moves, max(levels), args.duration)
    from deepship.bench.serve import bench_serve

    return bench_serve(package, levels, modes, args.duration, args.requests, args.items)


def run_train(args: argparse.Namespace) -> Rows:
    check_steps(args)
    from deepship.bench.train import bench_train

    return bench_train(args.modality, args.steps, args.batch_size, args.image_size, args.seq_len, args.compile,
                       args.device, args.backbone)


def run_runtime(args: argparse.Namespace) -> Rows:
    if not (args.run and args.package):
        raise ConfigError("bench runtime: needs --run RUN_DIR and --package PACKAGE_DIR (the run's export)")
    from deepship.bench.runtime import bench_runtime

    return bench_runtime(args.run, args.package, **given(runs=args.runs))


def run_pipeline(args: argparse.Namespace) -> Rows:
    check_steps(args)
    from deepship.bench.pipeline import bench_pipeline

    return bench_pipeline(args.modality, args.data, args.out, args.backbone, batch_size=args.batch_size,
                          steps=args.steps, device=args.device, image_size=args.image_size)


RUNNERS: dict[str, Callable[[argparse.Namespace], Rows]] = {
    "data": run_data, "finetune": run_finetune, "export": run_export, "serve": run_serve, "monitor": run_monitor,
    "train": run_train, "runtime": run_runtime, "pipeline": run_pipeline}
