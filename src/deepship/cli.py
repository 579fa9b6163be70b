"""`deepship <command>`: argument parsing and the mapping of errors to exit codes.

Exit codes are a contract that scripts and pipelines rely on (docs/architecture.md): 0 ok; 2 bad usage,
config or input; 4 a gate refused (`evaluate`'s objective, `registry promote`, `retrain`); 3 `monitor`
raised an alert; 143 `train` stopped by SIGTERM after saving; 1 anything else (a failed export gate included).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from deepship.errors import ConfigError, DeepshipError, first_line
from deepship.bench.cli import add_bench_parser  # argparse only: cheap
from deepship.registry.cli import add_registry_parser  # argparse only: cheap
from deepship.retrain_cli import add_retrain_parser  # argparse only: cheap
from deepship.serving.cli import add_serve_parser  # argparse only: cheap
from deepship.selection.cli import add_sweep_parser  # argparse only: cheap
from deepship.selection.curve_cli import add_learning_curve_parser  # argparse only: cheap


def cmd_train(args: argparse.Namespace) -> int:
    from deepship.config import load_config

    cfg = load_config(args.config, args.set)  # exit 2 before anything heavy is imported
    if args.resume:  # from last.ckpt if there is one
        explicit_false = cfg.train.resume is False and any(item.startswith("train.resume=") for item in args.set)
        if cfg.train.resume not in (False, True, "auto") or explicit_false:
            raise ConfigError(f"--resume continues from the run's last.ckpt, but train.resume={cfg.train.resume}; "
                              "give one of them")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": "auto"})})
    from deepship.evaluation.linear_probe import probe_applies
    from deepship.training import fit, is_launch_rank_zero  # torch, lightning: imported only once the config is good

    run_dir = fit(cfg)
    if not is_launch_rank_zero():
        return 0  # other ranks of a multi-process run: rank 0 reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"done: {metrics['epochs']} epochs in {metrics['train_time_s']:.1f} s; best epoch {metrics['best_epoch']}")
    for split in ("val", "test"):
        if split in metrics:
            print(f"{split}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics[split].items()))
    if metrics.get("linear_probe"):
        print(describe_probe(metrics["linear_probe"], metrics["val"]["accuracy"]))
    elif probe_applies(cfg):  # a text run has the TF-IDF baseline of `evaluate` instead
        print(f"linear probe: not run ({metrics.get('linear_probe_skipped')})")
    print(f"next: deepship export --run {shlex.quote(str(run_dir))} --out {shlex.quote(f'packages/{run_dir.name}')}")
    return 0


def describe_probe(probe: dict[str, Any], model_accuracy: float) -> str:
    """Did fine-tuning beat a logistic regression on the frozen pretrained features? One line per split the
    probe was scored on (val, and test when the run has one), each a paired comparison on the same inputs;
    `model_accuracy`: the model's val accuracy as metrics.json reports it."""
    from deepship.evaluation.baseline import describe_comparison

    lines = []
    for split, part in (("val", probe), ("test", probe.get("test"))):
        if part:
            vs = part["vs_model"]
            model = model_accuracy if split == "val" else vs["model_accuracy"]
            lines.append(f"linear probe ({split}, {vs['n']} inputs): accuracy={part['accuracy']:.4f} "
                         f"macro_f1={part['macro_f1']:.4f} C={probe['C']:g}; model {model:.4f}: "
                         + describe_comparison(vs, "fine-tuning", "the linear probe"))
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from deepship.export import AccuracyBudget, ExportOptions, export_package  # torch: only for export

    options = ExportOptions(quantize=args.quantize, opset=args.opset, tolerance=args.tolerance, overwrite=args.overwrite,
                            budget=AccuracyBudget(args.max_accuracy_drop, args.min_agreement))
    out = export_package(args.run, args.out, options)
    parity = json.loads((out / "parity.json").read_text())
    print(f"package: {out}")
    embeddings = parity.get("embeddings_max_abs_diff")
    print(f"parity ({parity['precision']}) on {parity.get('num_compared', '?')} inputs: logits max_abs_diff="
          f"{parity['max_abs_diff']:.3g}" + ("" if embeddings is None else f", embeddings {embeddings:.3g}")
          + f"; top1_agreement={parity['top1_agreement']:.2%} batch_sizes={parity['batch_sizes']}")
    if "quantization" in parity:
        q = parity["quantization"]
        print(f"int8: val_accuracy {q['val_accuracy']['torch_fp32']:.4f} -> {q['val_accuracy']['onnx_int8']:.4f}, "
              f"size {q['size_bytes']['fp32']} -> {q['size_bytes']['int8']} bytes, latency p50 batch 1 "
              f"{q['latency_ms_p50_batch1']['fp32']:.2f} -> {q['latency_ms_p50_batch1']['int8']:.2f} ms")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deepship.runtime.batch import predict_file  # torch-free: runs on serving hosts

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.output is None:
        count = predict_file(args.package, args.input, sys.stdout, args.batch_size, args.column)
    else:
        output = Path(args.output)
        tmp = output.with_name(f".{output.name}.partial")  # a failed run leaves no half-written file
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                count = predict_file(args.package, args.input, out, args.batch_size, args.column)
            os.replace(tmp, output)
        except OSError as exc:
            if exc.filename == str(tmp):  # name the file the user asked for, not our temp file
                raise OSError(exc.errno, exc.strerror, str(output)) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
    print(f"{count} predictions written to {args.output or 'stdout'}", file=sys.stderr)
    return 0


EXIT_GATE_FAILED = 4


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deepship.evaluation.evaluate import HTML_NAME, JSON_NAME, EvaluateOptions, evaluate_package

    for name in ("batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.latency_runs < 0:
        raise ConfigError(f"--latency-runs {args.latency_runs}: must be 0 (skip) or more")
    options = EvaluateOptions(compare=args.compare, baseline=args.baseline, baseline_train=args.baseline_train,
                              overrides=args.set, batch_size=args.batch_size, latency_runs=args.latency_runs,
                              n_resamples=args.bootstrap)
    report = evaluate_package(args.package, args.data, args.out, options)
    m, verdict = report["metrics"], report["verdict"]
    print(f"verdict: {verdict['summary']}")
    metric = report["objective"]["metric"]
    ci = m["ci95"].get(metric)
    print(f"{metric}={m[metric]:.4f}" + (f" [95% CI {ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
          + f" accuracy={m['accuracy']:.4f} n={m['n']} ece={report['calibration']['after']['ece']:.4f} "
          f"answered={report['selective']['coverage']:.1%}")
    if report["latency"]:
        lat = report["latency"]["batch_1"]
        print(f"latency batch 1: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms, p99 {lat['p99']:.2f} ms")
    if report["baseline"]:
        b = report["baseline"]
        print(f"baseline {b['name']}: accuracy={b['accuracy']:.4f} macro_f1={b['macro_f1']:.4f}"
              + (f" C={b['C']:g}" if "C" in b else ""))
    if report["comparison"]:
        print(f"compare: {report['comparison']['conclusion']}")
    print(f"report: {Path(args.out) / JSON_NAME} and {Path(args.out) / HTML_NAME}")
    return EXIT_GATE_FAILED if verdict["passed"] is False else 0


EXIT_ALERT = 3


def cmd_monitor(args: argparse.Namespace) -> int:
    from deepship.monitoring.html import HTML_NAME, JSON_NAME
    from deepship.monitoring.monitor import monitor_settings, run_monitor
    from deepship.runtime.predictor import Predictor

    cfg = monitor_settings(Predictor.load(args.package), args.config, args.set)  # settings fail before any reading
    report = run_monitor(args.package, args.current, args.out, cfg, args.labels)
    s = report["summary"]
    alerting = f": {', '.join(s['signals_alerting'])}" if s["alerting_windows"] else ""
    print(f"{report['current']['n']} predictions in {s['windows']} windows ({s['insufficient_windows']} too small "
          f"to judge); {s['alerting_windows']} alerting{alerting}")
    print(f"report: {Path(args.out) / JSON_NAME} and {Path(args.out) / HTML_NAME}")
    if s["alerting_windows"] and args.on_alert:
        run_on_alert(args.on_alert, Path(args.out) / JSON_NAME)
    return EXIT_ALERT if s["alerting_windows"] else 0


def run_on_alert(command: str, report: Path) -> int:
    """monitor --on-alert: run the command (no shell; the report's path in DEEPSHIP_MONITOR_REPORT) and say
    how it ended. monitor still exits 3: the alert is monitor's finding, the command's result is its own."""
    import subprocess

    env = {**os.environ, "DEEPSHIP_MONITOR_REPORT": str(report)}
    try:
        code = subprocess.run(shlex.split(command), env=env, check=False).returncode
    except OSError as exc:
        raise ConfigError(f"--on-alert {command!r}: cannot start it ({exc.strerror}); give a command on PATH") from None
    print(f"on-alert: `{command}` exited {code}", file=sys.stderr)
    return code


def cmd_data_report(args: argparse.Namespace) -> int:
    from deepship.config import load_config

    cfg = load_config(args.config, args.set)
    from deepship.data.report import HTML_NAME, JSON_NAME, data_report

    out = Path(args.out) if args.out else cfg.run_dir
    report = data_report(cfg, out)
    totals = report["totals"]
    print(f"data report: {out / JSON_NAME} and {out / HTML_NAME}")
    print(f"{totals['read']} samples read, {totals['quarantined']} quarantined ({totals['bad_fraction']:.2%}); "
          f"fingerprint {report['fingerprint']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepship", description="Fine-tune image and text classifiers, ship them as ONNX packages, then "
                                     "evaluate, serve, monitor, select and retrain them.",
        epilog="exit codes: 0 ok; 2 bad usage, config or input; 3 monitor alert; 4 a gate refused; 143 train stopped by "
               "SIGTERM after saving; 1 anything else")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a classifier from a YAML config")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart_text.yaml")
    train.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=3e-4 data.val_fraction=0.2")
    train.add_argument("--resume", action="store_true",
                       help="continue from the run's last.ckpt when there is one (same as --set train.resume=auto)")
    train.set_defaults(func=cmd_train)

    report = commands.add_parser("data-report", help="validate a config's data and write the data report")
    report.add_argument("--config", required=True, help="YAML config whose data to check")
    report.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.batch_size=16 data.max_length=64")
    report.add_argument("--out", default=None, help="folder for data_report.json/.html (default: the run directory)")
    report.set_defaults(func=cmd_data_report)

    add_bench_parser(commands)
    add_learning_curve_parser(commands)

    export = commands.add_parser("export", help="export a run to an ONNX model package, gated by a parity check")
    export.add_argument("--run", required=True, help="a finished run directory, e.g. checkpoints/my-run")
    export.add_argument("--out", required=True, help="package folder to write (must not exist, unless --overwrite)")
    export.add_argument("--quantize", choices=["int8"], default=None, help="int8: onnxruntime quantization")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="fp32 max |logit diff| (default 1e-4)")
    export.add_argument("--max-accuracy-drop", type=float, default=1.0,
                        help="int8: allowed val accuracy drop in points (default 1.0)")
    export.add_argument("--min-agreement", type=float, default=0.98,
                        help="int8: minimum top-1 agreement with PyTorch (default 0.98)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing package once the gate passes")
    export.set_defaults(func=cmd_export)

    evaluate = commands.add_parser("evaluate", help="evaluate a package on labeled data: report.json + report.html; "
                                                   "exit 4 when an objective gate fails")
    evaluate.add_argument("--package", required=True, help="model package folder written by export")
    evaluate.add_argument("--data", required=True,
                          help="labeled data read like training data: text CSV/JSONL/Parquet, image folder or CSV")
    evaluate.add_argument("--out", required=True, help="folder for report.json and report.html")
    evaluate.add_argument("--compare", default=None, metavar="PACKAGE",
                          help="a challenger package: side by side, paired bootstrap and McNemar tests")
    evaluate.add_argument("--baseline", choices=["tfidf", "linear-probe"], default=None,
                          help="train a cheap model on the package's training data and report it beside: tfidf (text: "
                               "TF-IDF + linear SVM) or linear-probe (image: logistic regression on the frozen "
                               "pretrained backbone's features)")
    evaluate.add_argument("--baseline-train", default=None, help="training data for --baseline (default: the package's)")
    evaluate.add_argument("--set", nargs="+", action="extend", default=[], metavar="objective.KEY=VALUE",
                          help="override the package's objective, e.g. --set objective.min=0.9 objective.metric=accuracy")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--latency-runs", type=int, default=100, help="timed batch-1 calls (0 skips latency)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="predict with a model package (no torch needed), JSONL out")
    predict.add_argument("--package", required=True, help="model package folder written by export")
    predict.add_argument("--input", required=True,
                         help="images: a file, folder or CSV (path column); texts: CSV/JSONL (text column) or .txt lines")
    predict.add_argument("--output", default=None, help="JSONL file to write (default: stdout)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--column", default=None, help="input column in a CSV/JSONL (default: text, or path for images)")
    predict.set_defaults(func=cmd_predict)

    add_serve_parser(commands)
    add_registry_parser(commands)
    add_sweep_parser(commands)

    monitor = commands.add_parser("monitor", help="drift and performance per window of a prediction log or dataset; "
                                                 "exit 3 on an alert")
    monitor.add_argument("--package", required=True, help="the model package that made (or will make) the predictions")
    monitor.add_argument("--current", required=True,
                         help="a prediction log (serve --log, JSONL) or a dataset to predict on the fly")
    monitor.add_argument("--out", required=True, help="folder for monitor.json and monitor.html")
    monitor.add_argument("--labels", default=None, help="CSV/JSONL with id,label: joins true labels by prediction id")
    monitor.add_argument("--config", default=None, help="YAML with a monitor: section (default: the package's config)")
    monitor.add_argument("--set", nargs="+", action="extend", default=[], metavar="monitor.KEY=VALUE",
                         help="override a monitor setting, e.g. --set monitor.window=1d monitor.alpha=0.05")
    monitor.add_argument("--on-alert", default=None, metavar="COMMAND",
                         help="run COMMAND (no shell) when a window alerts, e.g. \"deepship retrain ...\"")
    monitor.set_defaults(func=cmd_monitor)
    add_retrain_parser(commands)
    return parser


# OSErrors about a path the user gave (exit 2) vs the machine running out of room (exit 1).
BAD_PATH_ERRNOS = {errno.ENOENT: "not found", errno.EISDIR: "is a directory, expected a file",
                   errno.ENOTDIR: "is not a directory", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def describe_os_error(exc: OSError) -> tuple[str, int]:
    """One line and an exit code for a file-system error that escaped the commands' own checks."""
    where = exc.filename or "a file"
    if exc.errno in FULL_DISK_ERRNOS:
        return f"{where}: disk full ({exc.strerror}); free space or write to another disk, then rerun", 1
    if exc.errno in BAD_PATH_ERRNOS:
        return f"{where}: {BAD_PATH_ERRNOS[exc.errno]}; check the path", 2
    return f"{where}: {exc.strerror or first_line(exc)} (rerun with --debug for the traceback)", 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)  # usage errors exit 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DeepshipError as exc:
        if debug:
            raise
        print(f"error: {first_line(exc, 2000)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            raise
        message, code = describe_os_error(exc)
        print(f"error: {message}", file=sys.stderr)
        return code
    except ModuleNotFoundError as exc:  # e.g. `evaluate`/`monitor` on a torch-free serving install
        if debug:
            raise
        print(f"error: deepship {args.command} needs the '{exc.name}' package, which this install lacks; "
              "pip install \"deepship[train]\"", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {first_line(exc, 500)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
