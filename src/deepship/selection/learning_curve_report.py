"""learning_curve.json (every number), .csv (one row per run) and .html (verdict, table, plot), atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from deepship.files import atomic_write_text, finite
from deepship.htmlpage import esc, figure_tag, page, pyplot, table

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CSV_FIELDS = ["fraction", "seed", "n_train", "train_value", "train_ci_low", "train_ci_high", "val_value",
              "val_ci_low", "val_ci_high", "train_time_s", "epochs", "run_dir"]


def csv_text(runs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in runs:
        row = {k: r.get(k) for k in ("fraction", "seed", "n_train", "train_time_s", "epochs", "run_dir")}
        for split in ("train", "val"):
            low, high = r[split]["ci95"] or (None, None)
            row |= {f"{split}_value": r[split]["value"], f"{split}_ci_low": low, f"{split}_ci_high": high}
        writer.writerow(row)
    return buf.getvalue()


def plot_curve(result: dict[str, Any]) -> str:
    """Train and val metric vs training samples (log2 axis: equal steps are doublings), bands = mean +- 1.96 SE."""
    plt = pyplot()
    points, metric = result["points"], result["metric"]
    n = [p["n_train"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for split, color in (("train", "tab:orange"), ("val", "tab:blue")):
        mean = [p[split]["value"] for p in points]
        half = [Z95 * p[split]["se"] for p in points]
        ax.plot(n, mean, marker="o", color=color, label=f"{split} {metric}")
        ax.fill_between(n, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], color=color,
                        alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_xlabel("training samples")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title("learning curve (bands: 95% intervals)")
    return figure_tag(fig, "learning curve")


def render_html(result: dict[str, Any]) -> str:
    verdict = result["verdict"]
    css = {True: "pass", False: "none", None: "fail"}[verdict["more_data_helps"]]
    rows = [[f"{p['fraction']:g}", p["n_train"], p["seeds"], f"{p['train']['value']:.4f} ± {Z95 * p['train']['se']:.4f}",
             f"{p['val']['value']:.4f} ± {Z95 * p['val']['se']:.4f}"] for p in result["points"]]
    metric = result["metric"]
    body = (f"<h1>Learning curve: {esc(metric)}</h1><p>{esc(result['config'])} {esc(' '.join(result['overrides']))}"
            f" &middot; {result['seeds']} seed(s) per fraction &middot; {result['wall_time_s']} s</p>"
            f"<div class='{css}'><h2>{esc(verdict['text'])}</h2></div>"
            + table(["fraction", "training samples", "seeds", f"train {metric} (± 1.96 SE)",
                     f"val {metric} (± 1.96 SE)"], rows)
            + plot_curve(result))
    return page(f"deepship learning curve: {metric}", body)


def write_curve(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "learning_curve.json", json.dumps(finite(result), indent=2) + "\n")
    atomic_write_text(out / "learning_curve.csv", csv_text(result["runs"]))
    atomic_write_text(out / "learning_curve.html", render_html(result))
