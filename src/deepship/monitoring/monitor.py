"""`deepship monitor`: cut the current data into windows and compare each with the package's reference.

Current data is a prediction log (from `serve`, read with pyarrow: a million lines in seconds) or a
dataset predicted on the fly. Per window every signal gets a two-sample test and an effect size; the
p-values are Holm-corrected across the window's signals, and a signal alerts only when its adjusted
p-value is below `monitor.alpha` AND its effect reaches its limit. With labels (`--labels`, keyed by
id) the window also gets accuracy and macro-F1 with bootstrap intervals, and label drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deepship.config import MonitorConfig, parse_yaml, validate_section
from deepship.errors import ConfigError, DataError
from deepship.evaluation.metrics import bootstrap_values, percentile_interval, score
from deepship.monitoring.drift import binned, chi_square_test, holm, ks_test, mmd_drift, psi, sample_rows
from deepship.monitoring.reference import EMBEDDING_SAMPLE, read_embeddings
from deepship.runtime.batch import read_inputs
from deepship.runtime.inputs import labeled_rows
from deepship.runtime.predictor import Predictor, decide, softmax

SCHEMA_VERSION = 1
LOG_KEYS = {"label", "confidence", "probs"}  # what makes a JSONL file a prediction log
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_LABELED = 30  # labeled inputs a window needs before performance and label drift are judged


@dataclass(frozen=True)
class Current:
    """The current data as columns, one row per prediction."""

    source: str
    kind: str  # "log" or "data"
    ids: list[str]
    preds: np.ndarray  # (N,) class index decided by the package
    confidence: np.ndarray  # (N,)
    stats: dict[str, np.ndarray]  # numeric input signals, each (N,)
    ts: np.ndarray | None = None  # (N,) seconds since the epoch
    targets: np.ndarray | None = None  # (N,) true class index, -1 where unknown
    embeddings: np.ndarray | None = None  # (N, D)
    inputs: list[str] | None = None  # raw inputs when known (data, or a log written with log_inputs)

    def __len__(self) -> int:
        return len(self.preds)

    def take(self, index: np.ndarray) -> "Current":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(self, ids=[self.ids[i] for i in index], preds=self.preds[index],
                       confidence=self.confidence[index], stats={k: v[index] for k, v in self.stats.items()},
                       ts=pick(self.ts), targets=pick(self.targets), embeddings=pick(self.embeddings),
                       inputs=None if self.inputs is None else [self.inputs[i] for i in index])


# ------------------------------------------------------------------------------------ reading
def is_prediction_log(path: Path) -> bool:
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".ndjson", ".log"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and LOG_KEYS <= set(first)
    return False


def read_log(path: Path, labels: Sequence[str], signals: Sequence[str]) -> Current:
    """A serve prediction log -> columns (pyarrow's multithreaded JSON reader)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    try:
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 24))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable prediction log ({exc}); give the JSONL written by serve --log") from None
    index = pc.index_in(table["label"], value_set=pa.array(list(labels))).to_numpy(zero_copy_only=False)
    unknown = np.flatnonzero(np.isnan(index.astype(float)) if index.dtype.kind == "f" else index < 0)
    if unknown.size:
        row = int(unknown[0])
        raise DataError(f"{path} line {row + 1}: label '{table['label'][row]}' is not one of the package's labels; "
                        "monitor a log with the package that wrote it")
    stats = {}
    if "input_stats" in table.column_names:
        struct = table["input_stats"].combine_chunks()
        for name in signals:
            if name in [struct.type.field(i).name for i in range(struct.type.num_fields)]:
                values = pc.cast(struct.field(name), pa.float64())  # ints in JSON (tokens) read as int64
                stats[name] = pc.fill_null(values, float("nan")).to_numpy(zero_copy_only=False)
    ts = None
    if "ts" in table.column_names:
        stamps = pc.cast(table["ts"], pa.timestamp("us", tz="UTC"))
        ts = stamps.cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6
    inputs = table["input"].to_pylist() if "input" in table.column_names else None
    ids = [str(x) for x in table["id"].to_pylist()] if "id" in table.column_names else [str(i) for i in range(len(table))]
    return Current(str(path), "log", ids, index.astype(np.int64), table["confidence"].to_numpy().astype(float), stats,
                   ts=ts, inputs=inputs)


def read_data(path: Path, predictor: Predictor, signals: Sequence[str], batch_size: int = 32) -> Current:
    """A dataset predicted on the fly through the package (decision rule, input stats, embeddings)."""
    items = list(read_inputs(path, predictor.modality))
    inputs = [x for _, x in items]
    logits, embeddings, records = predictor.outputs_and_stats(inputs, batch_size, show_progress=True)
    preds, confidence, _ = decide(softmax(logits, predictor.temperature), predictor.labels, predictor.thresholds)
    stats = {name: np.array([float(r[name]) for r in records]) for name in signals if name in records[0]}
    return Current(str(path), "data", [i for i, _ in items], preds, confidence, stats, embeddings=embeddings,
                   inputs=inputs)


def join_labels(current: Current, path: Path, labels: Sequence[str]) -> Current:
    """Attach true labels from a table (CSV, JSONL, Parquet, ...) with `id` and `label` columns; unmatched
    rows stay unknown."""
    if not path.is_file():
        raise DataError(f"--labels {path}: not found; give a CSV or JSONL file with id and label columns")
    index = {label: i for i, label in enumerate(labels)}
    truth = {}
    for where, key, label in labeled_rows(path):
        if label not in index:
            raise DataError(f"--labels {path} {where}: label '{label}' is not one of {sorted(index)}")
        truth[key] = index[label]
    targets = np.array([truth.get(i, -1) for i in current.ids], dtype=np.int64)
    if not (targets >= 0).any():
        raise DataError(f"--labels {path}: no id matches the current data's ids (e.g. {current.ids[:2]}); "
                        "key the labels by the prediction log's id")
    return replace(current, targets=targets)


# ------------------------------------------------------------------------------------ windows
def window_slices(current: Current, window: int | str) -> list[tuple[str, str, np.ndarray]]:
    """(start, end, row indices) per window: consecutive counts, or fixed time buckets (in time order)."""
    n = len(current)
    if isinstance(window, int):
        return [(f"#{s}", f"#{min(s + window, n) - 1}", np.arange(s, min(s + window, n))) for s in range(0, n, window)]
    if current.ts is None or np.isnan(current.ts).any():
        raise ConfigError(f"monitor.window: '{window}' needs timestamps and {current.source} has none; "
                          "use a count, e.g. --set monitor.window=1000")
    width = int(window[:-1]) * UNITS[window[-1]]
    buckets = np.floor(current.ts / width).astype(np.int64)
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
    return [(iso(b * width), iso((b + 1) * width), np.flatnonzero(buckets == b)) for b in np.unique(buckets)]


def categorical_signal(reference: dict[str, Any], current: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    ref = np.array([reference["counts"][label] for label in labels])
    cur = np.bincount(current, minlength=len(labels))
    statistic, p_value = chi_square_test(ref, cur)
    return {"test": "chi_square", "statistic": statistic, "p_value": p_value, "effect": psi(ref, cur), "effect_name": "psi"}


def numeric_signal(reference: dict[str, Any], current: np.ndarray) -> dict[str, Any]:
    current = current[np.isfinite(current)]
    statistic, p_value = ks_test(np.asarray(reference["sample"]), current)
    effect = psi(np.asarray(reference["counts"]), binned(current, reference["edges"]))
    return {"test": "ks", "statistic": statistic, "p_value": p_value, "effect": effect, "effect_name": "psi",
            "mean": float(current.mean()) if current.size else None, "reference_mean": reference["mean"]}


def embedding_signal(reference: np.ndarray, current: np.ndarray, resolution: float) -> dict[str, Any]:
    """MMD^2 of (a sample of) the window's embeddings against the reference's, with the effect limit
    calibrated on halves of the reference (judge uses it unless monitor.limits names one)."""
    drift = mmd_drift(torch.from_numpy(reference), torch.from_numpy(sample_rows(current, EMBEDDING_SAMPLE)),
                      resolution)
    return {"test": "mmd_permutation", "statistic": drift["statistic"], "p_value": drift["p_value"],
            "effect": drift["statistic"], "effect_name": "mmd2", "calibrated_limit": drift["limit"]}


def embedding_resolution(alpha: float, signals: int) -> float:
    """The smallest p-value the permutation test must be able to report: half of Holm's strictest
    level, alpha / signals, so a clear shift alerts even when every other signal is quiet."""
    return alpha / (2 * signals)


def drift_signals(profile: dict[str, Any], part: Current, labels: Sequence[str],
                  ref_embeddings: np.ndarray | None, alpha: float) -> dict[str, dict[str, Any]]:
    signals = profile["signals"]
    out = {"predicted_class": categorical_signal(signals["predicted_class"], part.preds, labels),
           "confidence": numeric_signal(signals["confidence"], part.confidence)}
    for name, values in part.stats.items():
        if name in signals and np.isfinite(values).any():
            out[name] = numeric_signal(signals[name], values)
    known = part.targets[part.targets >= 0] if part.targets is not None else np.array([], dtype=np.int64)
    if "true_class" in profile and known.size >= MIN_LABELED:
        out["true_class"] = categorical_signal(profile["true_class"], known, labels)
    if ref_embeddings is not None and part.embeddings is not None:
        resolution = embedding_resolution(alpha, len(out) + 1)
        out["embeddings"] = embedding_signal(ref_embeddings, part.embeddings, resolution)
    return out


def judge(signals: dict[str, dict[str, Any]], cfg: MonitorConfig) -> None:
    """Holm across the window's signals; alert = adjusted p < alpha and effect >= the signal's limit."""
    adjusted = holm({name: s["p_value"] for name, s in signals.items()})
    for name, s in signals.items():
        limit = cfg.limits.get(name, s.get("calibrated_limit", cfg.psi_limit))
        s.update(p_adjusted=adjusted[name], limit=limit, alert=adjusted[name] < cfg.alpha and s["effect"] >= limit)


def performance(part: Current, profile: dict[str, Any], labels: Sequence[str], cfg: MonitorConfig,
                n_resamples: int = 500) -> dict[str, Any] | None:
    """Accuracy and macro-F1 of the labeled rows with bootstrap intervals; alert when accuracy's whole
    interval lies below reference - max_accuracy_drop."""
    if part.targets is None or "accuracy" not in profile:
        return None
    known = part.targets >= 0
    if known.sum() < MIN_LABELED:
        return {"labeled": int(known.sum()), "alert": False, "note": f"fewer than {MIN_LABELED} labeled inputs"}
    preds, targets = torch.from_numpy(part.preds[known]), torch.from_numpy(part.targets[known])
    probs = torch.nn.functional.one_hot(preds, len(labels)).double()  # decisions only: the log keeps no logits
    out: dict[str, Any] = {"labeled": int(known.sum()), "reference_accuracy": profile["accuracy"],
                           "floor": profile["accuracy"] - cfg.max_accuracy_drop}
    for name in ("accuracy", "macro_f1"):
        values = bootstrap_values(len(targets), lambda idx: score(name, probs[idx], preds[idx], targets[idx]),
                                  n_resamples)
        out[name], out[f"{name}_ci95"] = score(name, probs, preds, targets), list(percentile_interval(values))
    out["alert"] = out["accuracy_ci95"][1] < out["floor"]
    return out


def top_drifting_classes(profile: dict[str, Any], part: Current, labels: Sequence[str], k: int = 5) -> list[dict]:
    ref = profile["signals"]["predicted_class"]["counts"]
    total = max(1, sum(ref.values()))
    cur = np.bincount(part.preds, minlength=len(labels)) / max(1, len(part))
    rows = [{"class": c, "reference_share": ref[c] / total, "current_share": float(cur[i]),
             "difference": float(cur[i] - ref[c] / total)} for i, c in enumerate(labels)]
    return sorted(rows, key=lambda r: -abs(r["difference"]))[:k]


def evaluate_window(profile: dict[str, Any], part: Current, labels: Sequence[str], cfg: MonitorConfig,
                    ref_embeddings: np.ndarray | None) -> dict[str, Any]:
    """One window's signals, performance and state: ok, alert, or insufficient (too small to judge)."""
    if len(part) < cfg.min_window:
        return {"n": len(part), "state": "insufficient", "signals": {}, "performance": None, "top_drifting_classes": []}
    signals = drift_signals(profile, part, labels, ref_embeddings if cfg.embeddings else None, cfg.alpha)
    judge(signals, cfg)
    perf = performance(part, profile, labels, cfg)
    alert = any(s["alert"] for s in signals.values()) or bool(perf and perf["alert"])
    return {"n": len(part), "state": "alert" if alert else "ok", "signals": signals, "performance": perf,
            "top_drifting_classes": top_drifting_classes(profile, part, labels)}


# ------------------------------------------------------------------------------------- report
def monitor_current(profile: dict[str, Any], current: Current, labels: Sequence[str], cfg: MonitorConfig,
                    ref_embeddings: np.ndarray | None = None) -> dict[str, Any]:
    windows = []
    for number, (start, end, index) in enumerate(window_slices(current, cfg.window)):
        part = current.take(index)
        windows.append({"index": number, "start": start, "end": end,
                        **evaluate_window(profile, part, labels, cfg, ref_embeddings),
                        "examples": examples(part)})
    alerts = [{"window": w["index"], "start": w["start"], "signal": name, "effect": s["effect"], "limit": s["limit"],
               "p_adjusted": s["p_adjusted"]}
              for w in windows for name, s in w["signals"].items() if s["alert"]]
    alerts += [{"window": w["index"], "start": w["start"], "signal": "accuracy", "effect": w["performance"]["accuracy"],
                "limit": w["performance"]["floor"], "p_adjusted": None}
               for w in windows if w["performance"] and w["performance"]["alert"]]
    states = [w["state"] for w in windows]
    return {"schema_version": SCHEMA_VERSION, "created_at": datetime.now(timezone.utc).isoformat(),
            "current": {"source": current.source, "kind": current.kind, "n": len(current),
                        "labeled": int((current.targets >= 0).sum()) if current.targets is not None else 0},
            "reference": {k: profile[k] for k in ("source", "n", "accuracy") if k in profile},
            "config": cfg.model_dump(mode="json"),
            "summary": {"windows": len(windows), "alerting_windows": states.count("alert"),
                        "insufficient_windows": states.count("insufficient"),
                        "signals_alerting": sorted({a["signal"] for a in alerts})},
            "alerts": alerts, "windows": windows}


def examples(part: Current, k: int = 3) -> list[dict[str, Any]]:
    """The least confident inputs of the window, when the raw inputs are known (never logged by default)."""
    if part.inputs is None or not len(part):
        return []
    order = np.argsort(part.confidence)[:k]
    return [{"id": part.ids[i], "input": str(part.inputs[i])[:300], "confidence": float(part.confidence[i]),
             "predicted": int(part.preds[i])} for i in order]


def load_current(predictor: Predictor, source: str, labels_file: str | None) -> Current:
    from deepship.data.sources import resolve_source  # demo:NAME/... sources, as in training and evaluate

    path = resolve_source(source)
    if not path.exists():
        raise DataError(f"--current {path}: not found; give a prediction log (serve --log) or a dataset")
    signals = predictor.modality.signals
    current = read_log(path, predictor.labels, signals) if is_prediction_log(path) else read_data(path, predictor, signals)
    if not len(current):
        raise DataError(f"--current {path}: holds no predictions or inputs")
    return join_labels(current, Path(labels_file), predictor.labels) if labels_file else current


def package_profile(predictor: Predictor) -> dict[str, Any]:
    profile = predictor.manifest.get("reference")
    if not profile:
        raise DataError(f"{predictor.package_dir}: the package has no reference profile (exported before monitoring "
                        "existed); re-export it with this deepship")
    return profile


def monitor_settings(predictor: Predictor, config_path: str | None, overrides: Sequence[str]) -> MonitorConfig:
    """The package's `monitor:` section (or --config's), with `--set monitor.KEY=VALUE` applied."""
    raw = dict((predictor.manifest.get("config") or {}).get("monitor") or {})
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: file not found; give a YAML file with a monitor: section")
        loaded = parse_yaml(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping with a monitor: section")
        raw = dict(loaded.get("monitor") or {})
    return validate_section(MonitorConfig, "monitor", raw, overrides, "monitor", "window=1d")


def run_monitor(package: str | Path, current_path: str, out: str | Path, cfg: MonitorConfig,
                labels_file: str | None = None) -> dict[str, Any]:
    """Monitor `current_path` against the package's reference; writes monitor.json and monitor.html."""
    from deepship.monitoring.html import write_monitor_report

    predictor = Predictor.load(package)
    profile = package_profile(predictor)
    current = load_current(predictor, current_path, labels_file)
    report = monitor_current(profile, current, predictor.labels, cfg, read_embeddings(Path(package), profile))
    report["package"] = {"model_version": predictor.model_version, "labels": predictor.labels, "path": str(package)}
    write_monitor_report(report, Path(out))
    return report
