"""monitor.json (every number) and monitor.html (time series per signal with the alert limit drawn in,
performance over time when labels are joined, the top drifting classes, example inputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepship.files import atomic_write_text, finite
from deepship.htmlpage import esc, figure_tag, page, pyplot, table

JSON_NAME, HTML_NAME = "monitor.json", "monitor.html"


def integer_windows(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window")


def plot_signal(report: dict[str, Any], name: str) -> str:
    """Effect size per window (PSI, or MMD^2 for embeddings) with the alert limit; alerts in red."""
    plt = pyplot()
    windows = [w for w in report["windows"] if name in w["signals"]]
    x = [w["index"] for w in windows]
    effects = [w["signals"][name]["effect"] for w in windows]
    limits = [w["signals"][name]["limit"] for w in windows]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.plot(x, effects, marker="o", color="tab:blue", label=windows[0]["signals"][name]["effect_name"])
    alerts = [(i, e) for i, e, w in zip(x, effects, windows) if w["signals"][name]["alert"]]
    if alerts:
        ax.scatter(*zip(*alerts), color="red", zorder=3, label="alert")
    if len(set(limits)) == 1:
        ax.axhline(limits[0], color="red", linestyle="--", label=f"limit {limits[0]:g}")
    else:  # calibrated per window (embeddings: from reference halves of the window's size)
        ax.step(x, limits, where="mid", color="red", linestyle="--", label="limit (per window)")
    integer_windows(ax)
    ax.set_title(f"{name}: drift per window")
    ax.legend(fontsize=7)
    return figure_tag(fig, f"{name} drift over time")


def plot_performance(report: dict[str, Any]) -> str:
    plt = pyplot()
    windows = [w for w in report["windows"] if w["performance"] and "accuracy" in w["performance"]]
    x = [w["index"] for w in windows]
    acc = [w["performance"]["accuracy"] for w in windows]
    lo = [a - w["performance"]["accuracy_ci95"][0] for a, w in zip(acc, windows)]
    hi = [w["performance"]["accuracy_ci95"][1] - a for a, w in zip(acc, windows)]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.errorbar(x, acc, yerr=[lo, hi], marker="o", capsize=3, label="accuracy (95% CI)")
    ax.axhline(windows[0]["performance"]["reference_accuracy"], color="gray", linestyle=":", label="reference (val)")
    ax.axhline(windows[0]["performance"]["floor"], color="red", linestyle="--", label="alert floor")
    integer_windows(ax)
    ax.set_title("model performance over time")
    ax.legend(fontsize=7)
    return figure_tag(fig, "model performance over time")


def windows_table(report: dict[str, Any]) -> str:
    rows = []
    for w in report["windows"]:
        alerting = ", ".join(n for n, s in w["signals"].items() if s["alert"])
        if w["performance"] and w["performance"].get("alert"):
            alerting = ", ".join(filter(None, [alerting, "accuracy"]))
        rows.append([w["index"], w["start"], w["end"], w["n"], w["state"], alerting])
    return table(["window", "start", "end", "n", "state", "alerting signals"], rows)


def render_html(report: dict[str, Any]) -> str:
    s = report["summary"]
    css = "fail" if s["alerting_windows"] else "pass"
    verdict = (f"ALERT in {s['alerting_windows']} of {s['windows']} windows ({', '.join(s['signals_alerting'])})"
               if s["alerting_windows"] else f"no alert in {s['windows']} windows")
    parts = [f"<h1>Monitoring: {esc(report['package']['model_version'])}</h1>",
             f"<p>current: {esc(report['current']['source'])} ({report['current']['kind']}, {report['current']['n']} "
             f"predictions, {report['current']['labeled']} labeled) &middot; reference: "
             f"{esc(report['reference'].get('source'))} &middot; {esc(report['created_at'])}</p>",
             f"<div class='{css}'><h2>{esc(verdict)}</h2><p>alert = Holm-adjusted p &lt; {report['config']['alpha']} "
             f"and effect &ge; its limit; windows under {report['config']['min_window']} inputs are not judged</p></div>",
             "<h2>Windows</h2>" + windows_table(report)]
    if any(w["performance"] and "accuracy" in w["performance"] for w in report["windows"]):
        parts.append("<h2>Performance</h2>" + plot_performance(report))
    names = list(dict.fromkeys(n for w in report["windows"] for n in w["signals"]))
    parts.append("<h2>Signals</h2>" + "".join(plot_signal(report, n) for n in names))
    judged = [w for w in report["windows"] if w["state"] != "insufficient"]
    if judged:
        worst = max(judged, key=lambda w: max((sig["effect"] for sig in w["signals"].values()), default=0.0))
        rows = [[r["class"], f"{r['reference_share']:.3f}", f"{r['current_share']:.3f}", f"{r['difference']:+.3f}"]
                for r in worst["top_drifting_classes"]]
        parts.append(f"<h2>Top drifting classes (window {worst['index']})</h2>"
                     + table(["predicted class", "reference share", "current share", "difference"], rows))
        labels = report["package"]["labels"]
        examples = [[e["id"], e["input"], labels[e["predicted"]], f"{e['confidence']:.3f}"] for e in worst["examples"]]
        if examples:
            parts.append("<h2>Least confident inputs of that window</h2>"
                         + table(["id", "input", "predicted", "confidence"], examples))
    return page(f"deepship monitor: {report['package']['model_version']}", "".join(parts))


def write_monitor_report(report: dict[str, Any], out: Path) -> None:
    """Render first, then write both files atomically: a failure leaves no half report."""
    text = json.dumps(finite(report), indent=2, allow_nan=False) + "\n"
    html = render_html(report)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / JSON_NAME, text)
    atomic_write_text(out / HTML_NAME, html)
