"""The data report: validate the configured data (stopping with the report written when too much is bad),
and render data_report.json (every number) and data_report.html (one self-contained file: tables plus
matplotlib plots embedded as base64 PNGs, so it can be mailed)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from deepship.config import Config
from deepship.data.split import DataValidationError, Splits, load_validated
from deepship.errors import DataError
from deepship.files import atomic_write_text
from deepship.htmlpage import figure_tag, img_tag, page, pyplot, table

JSON_NAME, HTML_NAME = "data_report.json", "data_report.html"
MAX_ROWS = 200  # the HTML lists this many quarantined samples; the JSON lists all


def write_data_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write both files atomically; returns the JSON path (the one to cite in messages)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / JSON_NAME, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / HTML_NAME, render_html(report))
    return out_dir / JSON_NAME


def validate_data(cfg: Config, out_dir: Path) -> tuple[Splits, dict[str, Any]]:
    """Validated splits and the data report; too many bad samples stop here, the full report written."""
    try:
        return load_validated(cfg)
    except DataValidationError as exc:
        path = write_data_report(exc.report, out_dir)
        raise DataError(f"{exc}; see {path} for the list, then fix or remove them or raise the limit") from None


def record_truncation(report: dict[str, Any], split: str, truncated: int, max_length: int) -> None:
    report["splits"][split]["truncated"] = truncated
    if truncated:
        report["warnings"].append(f"{split}: {truncated} texts are longer than {max_length} tokens "
                                  "and get truncated (data.max_length)")


def data_report(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """`deepship data-report`: validate and write the report without training (tokenizer only, no weights)."""
    from deepship.data.text import count_truncated
    from deepship.models.backbones import load_text_tokenizer
    from deepship.runtime.preprocess import TextPreprocessor

    splits, report = validate_data(cfg, out_dir)
    if cfg.task == "text_classification":
        tokenizer, _, spec = load_text_tokenizer(cfg.model, cfg.data, len(splits.classes))
        preprocessor = TextPreprocessor(tokenizer.backend_tokenizer, spec)
        for name, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if samples is not None:
                record_truncation(report, name, count_truncated(preprocessor.tokenize(samples.inputs)), spec.max_length)
    write_data_report(report, out_dir)
    return report


def plot_class_balance(report: dict[str, Any]) -> str:
    import numpy as np

    plt = pyplot()

    classes = report.get("classes", [])
    splits = [s for s in report["splits"] if "class_counts" in report["splits"][s]]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(classes) * max(1, len(splits))), 3))
    width = 0.8 / max(1, len(splits))
    for i, name in enumerate(splits):
        counts = [report["splits"][name]["class_counts"][c] for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, counts, width, label=name)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right")
    ax.set_ylabel("samples")
    ax.set_title("class balance per split")
    ax.legend()
    return figure_tag(fig, "class balance per split")


def plot_histograms(report: dict[str, Any], key: str, xlabel: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, split in report["splits"].items():
        hist = split.get(key)
        if hist and hist["counts"]:
            edges = hist["bins"]
            ax.stairs(hist["counts"], edges, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend()
    return figure_tag(fig, f"{xlabel} histogram")


def _thumbnail(path: str) -> str:
    from deepship.runtime.preprocess import load_image

    try:
        img = load_image(path)
    except Exception:  # noqa: BLE001 - a report must render even when one file went away
        return html.escape(path)
    img.thumbnail((64, 64))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img_tag(buf.getvalue(), Path(path).name, css_class="thumb")


def _examples_html(report: dict[str, Any]) -> str:
    text = report["task"] == "text_classification"
    rows = []
    for label, items in report.get("examples", {}).items():
        cells = "".join(f"<td>{html.escape(x[:160]) if text else _thumbnail(x)}</td>" for x in items)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _split_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, s in report["splits"].items():
        quarantined = ", ".join(f"{k}: {v}" for k, v in s.get("quarantined", {}).items()) or "0"
        sources = s.get("sources", "") + (f"; trains on {s['subset']}" if "subset" in s else "")
        rows.append([name, sources, s.get("read", ""), s.get("used", ""), quarantined,
                     s.get("duplicates", {}).get("count", ""), s.get("non_utf8", "-"), s.get("truncated", "-")])
    return rows


def render_html(report: dict[str, Any]) -> str:
    t = report.get("totals", {})
    text = report["task"] == "text_classification"
    parts = [
        f"<h1>Data report</h1><p>{html.escape(report['task'])} &middot; created {html.escape(report['created'])}"
        f" &middot; fingerprint <code>{html.escape(report.get('fingerprint', 'n/a'))}</code></p>",
        f"<p><b>{t.get('quarantined', 0)}</b> of {t.get('read', 0)} samples quarantined "
        f"({t.get('bad_fraction', 0):.2%}; limit {t.get('max_bad_fraction', 0):.2%})</p>",
        "<h2>Warnings</h2>" + ("<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>"
                                if report["warnings"] else "<p>none</p>"),
        "<h2>Splits</h2>" + table(["split", "sources", "read", "used", "quarantined", "duplicates", "non-UTF-8",
                                    "truncated"], _split_rows(report)),
    ]
    if report.get("classes"):
        parts.append("<h2>Class balance</h2>" + plot_class_balance(report))
    if text:
        parts.append("<h2>Text length (characters)</h2>" + plot_histograms(report, "text_length", "characters"))
    else:
        parts.append("<h2>Image size</h2>" + plot_histograms(report, "image_width", "width (px)")
                     + plot_histograms(report, "image_height", "height (px)"))
    leakage = [[n, e["count"], e["removed"], "; ".join(f"{x['sample']} = {x['train']}" for x in e["examples"])]
               for n, e in report.get("leakage", {}).items()]
    parts.append("<h2>Leakage (also in train)</h2>" + table(["split", "count", "removed", "examples"], leakage))
    conflicts = report.get("label_conflicts", {"count": 0, "examples": []})
    parts.append(f"<h2>Label conflicts ({conflicts['count']})</h2>" + table(
        ["input", "labels", "where"], [[e["input"], e["labels"], "; ".join(e["origins"])] for e in conflicts["examples"]]))
    quarantine = report["quarantine"]
    parts.append(f"<h2>Quarantine ({len(quarantine)})</h2>" + table(
        ["split", "sample", "reason"], [[q["split"], q["origin"], q["reason"]] for q in quarantine[:MAX_ROWS]]))
    if report.get("examples"):
        parts.append("<h2>Examples per class (train)</h2>" + _examples_html(report))
    return page("deepship data report", "".join(parts))
