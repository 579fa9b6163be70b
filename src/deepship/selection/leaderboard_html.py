"""leaderboard.html: the ranked table and four plots (metric vs latency with its Pareto front, optimization
history, parameter importances, best trial per backbone), one self-contained file. A plot that cannot be
drawn from these trials is replaced by a sentence saying why."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

from deepship.htmlpage import esc, figure_tag, page, pyplot, table
from deepship.selection.records import TrialRecord

if TYPE_CHECKING:
    import optuna


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the (metric, latency) points no other point dominates; higher metric and lower
    latency are better, and a dominating point is at least as good in both and better in one. Identical
    points do not dominate each other, so all of them stay on the front."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front: list[int] = []
    best = -math.inf
    for i in order:  # by latency: a point is on the front if it beats every faster point's metric
        if points[i][0] > best or (front and points[i] == points[front[-1]]):
            front.append(i)
            best = points[i][0]
    return sorted(front)


def backbone_of(record: TrialRecord) -> str | None:
    return record.backbone or record.params.get("model.backbone")


def _complete(ranked: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [r for r in ranked if r.state == "complete" and r.value is not None and math.isfinite(r.value)]


def _unavailable(title: str, why: str) -> str:
    return f"<h2>{esc(title)}</h2><p class='none'>{esc(why)}</p>"


def plot_latency(ranked: Sequence[TrialRecord], metric: str) -> str:
    title = f"{metric} vs latency"
    trials = [r for r in _complete(ranked) if r.latency_p95_ms is not None]
    if not trials:
        return _unavailable(title, "no complete trial has a latency measurement")
    points = [(r.value, r.latency_p95_ms) for r in trials]
    front = pareto_front(points)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([p[1] for p in points], [p[0] for p in points], color="tab:gray", label="trial")
    best_first = sorted(front, key=lambda i: points[i][1])
    ax.step([points[i][1] for i in best_first], [points[i][0] for i in best_first], where="post", color="tab:red",
            marker="o", label="Pareto front")
    for i in front:
        ax.annotate(str(trials[i].number), (points[i][1], points[i][0]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("batch-1 latency p95 (ms)")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title("higher and further left is better")
    numbers = ", ".join(str(trials[i].number) for i in best_first)
    return (f"<h2>{esc(title)}</h2><p>Pareto front (no other trial is both better and faster): trials "
            f"{esc(numbers)}</p>" + figure_tag(fig, title))


def plot_history(ranked: Sequence[TrialRecord], metric: str) -> str:
    title = "optimization history"
    scored = sorted((r for r in ranked if r.value is not None and math.isfinite(r.value)), key=lambda r: r.number)
    if not scored:
        return _unavailable(title, "no trial reported a value")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for state, color in (("complete", "tab:blue"), ("pruned", "tab:orange")):
        part = [r for r in scored if r.state == state]
        if part:
            ax.scatter([r.number for r in part], [r.value for r in part], color=color, label=state)
    complete = [r for r in scored if r.state == "complete"]
    if complete:
        best, steps = -math.inf, []
        for r in complete:
            best = max(best, r.value)
            steps.append(best)
        ax.step([r.number for r in complete], steps, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric + " (pruned: last value reported)")
    ax.legend()
    return f"<h2>{esc(title)}</h2>" + figure_tag(fig, title)


def importance_unavailable(ranked: Sequence[TrialRecord], study: "optuna.Study | None") -> str | None:
    """Why parameter importances cannot be computed here, or None when they can."""
    if study is None:
        return "no Optuna study was given"
    complete = _complete(ranked)
    if len(complete) < 2:
        return f"{len(complete)} complete trial(s); importances need at least 2"
    names = {k for r in complete for k in r.params}
    if not any(len({repr(r.params.get(k)) for r in complete}) > 1 for k in names):
        return "every complete trial used the same parameters"
    return None


def plot_importances(ranked: Sequence[TrialRecord], study: "optuna.Study | None") -> str:
    title = "parameter importances"
    why = importance_unavailable(ranked, study)
    if why is not None:
        return _unavailable(title, f"not computed: {why}")
    import optuna

    with warnings.catch_warnings():  # fANOVA warns about quantile regions on a handful of trials; the plot says enough
        warnings.simplefilter("ignore", UserWarning)
        importances = optuna.importance.get_param_importances(study)
    names = list(importances)[::-1]  # largest at the top of a horizontal bar chart
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, max(2.0, 0.4 * len(names) + 1)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (share of the objective's variance, Optuna's default evaluator)")
    return f"<h2>{esc(title)}</h2>" + figure_tag(fig, title)


def plot_backbones(ranked: Sequence[TrialRecord], metric: str) -> str:
    title = "best trial per backbone"
    best: dict[str, TrialRecord] = {}
    for r in _complete(ranked):  # ranked: the first seen of a backbone is its best
        name = backbone_of(r)
        if name is not None:
            best.setdefault(name, r)
    if not best:
        return _unavailable(title, "no complete trial names its backbone")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(best) + 2), 3.5))
    names = list(best)
    ax.bar(names, [best[n].value for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.annotate(f"trial {best[n].number}", (i, best[n].value), ha="center", textcoords="offset points",
                    xytext=(0, 3), fontsize=8)
    ax.set_ylabel(metric)
    ax.tick_params(axis="x", labelrotation=20)
    return f"<h2>{esc(title)}</h2>" + figure_tag(fig, title)


def render_leaderboard_html(ranked: Sequence[TrialRecord], metric: str, study: "optuna.Study | None", summary: str,
                            headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The page: `summary` (the best trial in a line) and the ranked table's `headers` and `rows`, then the plots."""
    body = (f"<h1>Leaderboard: {esc(metric)} (higher is better)</h1><p>{esc(summary)}</p>" + table(headers, rows)
            + plot_latency(ranked, metric) + plot_history(ranked, metric) + plot_importances(ranked, study)
            + plot_backbones(ranked, metric))
    return page(f"deepship leaderboard: {metric}", body)
