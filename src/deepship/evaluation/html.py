"""report.html: the evaluation report as a model card a person reads, verdict first.

Every plot is drawn from report.json's numbers (never from the model), so the two cannot disagree.
"""

from __future__ import annotations

from typing import Any

from deepship.evaluation.baseline import describe_comparison
from deepship.htmlpage import esc, figure_tag, page, pyplot, table


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plot_confusion(report: dict[str, Any]) -> str:
    import numpy as np

    plt = pyplot()
    labels = list(report["data"]["class_counts"])
    matrix = np.asarray(report["metrics"]["confusion_matrix"])
    size = max(3.5, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return figure_tag(fig, "confusion matrix")


def plot_reliability(report: dict[str, Any]) -> str:
    """Accuracy per confidence bin before and after temperature scaling; bar labels are bin counts and
    empty bins are marked, so a reader can tell a well-calibrated bin from one with no data."""
    plt = pyplot()
    cal = report["calibration"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("before", "after")):
        part = cal[key]
        for b in part["bins"]:
            mid, width = (b["lo"] + b["hi"]) / 2, b["hi"] - b["lo"]
            if b["count"]:
                ax.bar(mid, b["accuracy"], width * 0.9, color="tab:blue")
                ax.text(mid, b["accuracy"] + 0.02, str(b["count"]), ha="center", fontsize=6)
            else:
                ax.bar(mid, 1.0, width * 0.9, color="none", edgecolor="lightgray", hatch="//")
        ax.plot([0, 1], [0, 1], "--", color="gray")
        t = 1.0 if key == "before" else cal["temperature"]
        ax.set_title(f"{key} (T={t:.3g}): ECE {part['ece']:.3f}, MCE {part['mce']:.3f}")
        ax.set_xlabel("confidence (hatched: empty bin; numbers: samples)")
    axes[0].set_ylabel("accuracy")
    return figure_tag(fig, "reliability diagram before and after calibration")


def plot_risk_coverage(report: dict[str, Any]) -> str:
    plt = pyplot()
    sel = report["selective"]
    curve = sel["risk_coverage"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["coverage"], curve["risk"], label="risk (error among answered)")
    ax.scatter([sel["coverage"]], [1 - (sel["precision_answered"] or 0.0)], color="red", zorder=3,
               label=f"package thresholds: coverage {sel['coverage']:.2f}")
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("risk")
    ax.set_xlim(0, 1.01)
    ax.legend()
    ax.set_title("risk-coverage")
    return figure_tag(fig, "risk-coverage curve")


def plot_per_class(report: dict[str, Any]) -> str:
    import numpy as np

    plt = pyplot()
    per_class = report["metrics"]["per_class"]
    labels = list(per_class)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(labels)), 3.5))
    for i, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, [per_class[c][key] for c in labels], 0.27, label=key)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("per-class precision, recall, F1")
    return figure_tag(fig, "per-class metrics")


def plot_history(history: list[dict[str, Any]]) -> str:
    plt = pyplot()
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [row.get("epoch") for row in history]
    for key, ax in (("train_loss", loss_ax), ("val_loss", loss_ax), ("val_accuracy", score_ax),
                    ("val_macro_f1", score_ax)):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", label=key)
    for ax, title in ((loss_ax, "loss"), (score_ax, "validation score")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    return figure_tag(fig, "learning curves")


# ------------------------------------------------------------------------------------ sections
def verdict_html(report: dict[str, Any]) -> str:
    v = report["verdict"]
    css = {True: "pass", False: "fail", None: "none"}[v["passed"]]
    result = {True: "pass", False: "FAIL", None: "not measured"}
    rows = [[g["name"], fmt(g["value"]), fmt(g["limit"]), result[g["passed"]]] for g in v["gates"]]
    gates = table(["gate", "value", "limit", "result"], rows) if rows else ""
    return f"<div class='{css}'><h2>Verdict: {esc(v['summary'])}</h2>{gates}</div>"


def metrics_html(report: dict[str, Any]) -> str:
    m = report["metrics"]
    names = ["accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc", "pr_auc", "log_loss",
             *[k for k in m if k.startswith("top")]]
    rows = [[n, fmt(m.get(n)), "" if not m["ci95"].get(n) else f"[{m['ci95'][n][0]:.4f}, {m['ci95'][n][1]:.4f}]"]
            for n in names if n in m]
    per_class = [[c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]] for c, v in m["per_class"].items()]
    return ("<h2>Metrics</h2>" + table(["metric", "value", "95% bootstrap CI"], rows)
            + table(["class", "precision", "recall", "F1", "support"], per_class)
            + plot_per_class(report) + plot_confusion(report))


def selective_html(report: dict[str, Any]) -> str:
    sel = report["selective"]
    rule = sel["thresholds"] or {}
    rows = [["rule", rule.get("basis") or "none (always answer)"], ["target", fmt(rule.get("target"))],
            ["global min_confidence", fmt(rule.get("min_confidence"), 6)],
            ["feasible on " + str(rule.get("fitted_on", "validation")), fmt(rule.get("feasible"))],
            ["answered here", f"{sel['answered']} ({sel['coverage']:.1%})"],
            ["precision of answered here", fmt(sel["precision_answered"])]]
    if rule.get("note"):
        rows.append(["note", rule["note"]])
    if rule.get("per_class"):
        rows += [[f"threshold for '{c}'", fmt(t, 6)] for c, t in rule["per_class"].items()]
    if sel["at_target_on_this_data"]:
        t = sel["at_target_on_this_data"]
        rows.append(["threshold the target needs on this data",
                     f"{fmt(t['value'], 6)} (coverage {t['coverage']:.1%})" if t["feasible"] else t["note"]])
    if sel["cost"]:
        c = sel["cost"]
        rows += [["cost threshold on P(positive)", fmt(c["threshold"])],
                 ["expected cost per input", fmt(c["expected_cost"])],
                 ["expected cost at 0.5", fmt(c["expected_cost_at_0_5"])],
                 ["best threshold on this data", f"{fmt(c['best_on_this_data']['threshold'])} "
                                                  f"(cost {fmt(c['best_on_this_data']['expected_cost'])})"]]
    return "<h2>Confidence thresholds</h2>" + table(["", ""], rows) + plot_risk_coverage(report)


def calibration_html(report: dict[str, Any]) -> str:
    cal = report["calibration"]
    rows = [[k, fmt(cal[k]["ece"]), fmt(cal[k]["mce"]), fmt(cal[k]["nll"])] for k in ("before", "after")]
    return (f"<h2>Calibration</h2><p>temperature {cal['temperature']:.4g}, fitted on {esc(cal['fitted_on'])}</p>"
            + table(["", "ECE (15 bins)", "MCE", "NLL"], rows) + plot_reliability(report))


def extras_html(report: dict[str, Any]) -> str:
    parts = []
    if report["latency"]:
        lat = report["latency"]
        rows = [[k.replace("_", " "), v["runs"], v["p50"], v["p95"], v["p99"]]
                for k, v in lat.items() if k.startswith("batch_")]
        parts.append(f"<h2>Latency ({esc(lat['host'])}; {esc(lat['includes'])})</h2>"
                     + table(["batch", "runs", "p50 ms", "p95 ms", "p99 ms"], rows))
    if report["baseline"]:
        b = report["baseline"]
        chosen = f" (C = {b['C']:g}, chosen by cross-validation)" if "C" in b else ""
        parts.append(f"<h2>Baseline: {esc(b['name'])}{chosen}</h2>" + table(
            ["", "accuracy", "macro F1"], [["model", fmt(report["metrics"]["accuracy"]), fmt(report["metrics"]["macro_f1"])],
                                           ["baseline", fmt(b["accuracy"]), fmt(b["macro_f1"])]]))
        for split, part in (("these inputs", b), ("the run's test split", b.get("test"))):
            if part and part.get("vs_model"):
                parts.append(f"<p>On {split} ({part['vs_model']['n']}, paired): "
                             f"{esc(describe_comparison(part['vs_model'], 'the model', 'the baseline'))}</p>")
    if report["comparison"]:
        c = report["comparison"]
        ci = c["paired_bootstrap"]["ci"]
        rows = [["champion (this package)", fmt(c["champion_value"])],
                [f"challenger {c['challenger'].get('model_version')}", fmt(c["challenger_value"])],
                ["difference (challenger - champion)", fmt(c["difference"])],
                ["95% CI of the difference", "undefined" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"],
                ["paired bootstrap p", fmt(c["paired_bootstrap"]["p_value"])],
                ["McNemar p (b, c)", f"{fmt(c['mcnemar']['p_value'])} ({c['mcnemar']['b']}, {c['mcnemar']['c']})"]]
        parts.append(f"<h2>Comparison on {esc(c['metric'])}: {esc(c['conclusion'])}</h2>" + table(["", ""], rows))
    if report["history"]:
        parts.append("<h2>Learning curves</h2>" + plot_history(report["history"]))
    if report["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    model, data = report["model"], report["data"]
    header = (f"<h1>Evaluation: {esc(model.get('name'))}</h1><p>{esc(model.get('task'))} &middot; model "
              f"<code>{esc(model.get('model_version'))}</code> ({esc(model.get('precision'))}) &middot; data "
              f"{esc(data.get('source'))} ({data['n']} samples) &middot; {esc(report['created_at'])}</p>")
    body = header + verdict_html(report) + metrics_html(report) + calibration_html(report) + selective_html(report) \
        + extras_html(report)
    return page(f"deepship evaluation: {model.get('name')}", body)
