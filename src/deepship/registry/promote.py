"""Gated promotion: move `to_alias` to the `from_alias` version only if the evaluation says it is safe.

The rule (docs/registry.md): on the same labeled data, the candidate's own objective gates must pass
(objective.min, objective.latency_budget_ms), and the paired bootstrap 95% interval of
candidate - current on the objective metric must have its lower bound above -max_regression. With
no current holder, only the candidate's gates apply. A refusal moves nothing and logs
"promote_refused" with both numbers; --force promotes anyway and logs forced=true.

Scoring goes through the evaluation layer (`evaluate_package`), so torch is imported only here, only
when promoting. Both reports are written under the registry (`promotion_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from deepship.errors import ConfigError
from deepship.registry.base import Registry, VersionInfo


@dataclass
class PromotionDecision:
    promoted: bool
    forced: bool
    reason: str  # one line, with both numbers
    candidate: dict[str, Any]  # version, metric, value, ci95, latency_p95_ms, gates
    current: dict[str, Any] | None
    diff: float | None = None  # candidate - current on the objective metric
    diff_ci95: tuple[float, float] | None = None
    report_dir: Path | None = None
    event: dict[str, Any] = field(default_factory=dict)


def promote(registry: Registry, name: str, from_alias: str = "challenger", to_alias: str = "production",
            data: str | None = None, max_regression: float = 0.0, force: bool = False,
            objective_overrides: Sequence[str] = (), actor: str | None = None, n_resamples: int = 1000,
            latency_runs: int = 100) -> PromotionDecision:
    """Evaluate, decide, then (under the model's lock, if the aliases did not move meanwhile) promote or log the refusal."""
    registry.check_alias(from_alias)
    registry.check_alias(to_alias)
    before = registry.aliases(name)
    if from_alias not in before:
        raise ConfigError(f"{name}@{from_alias}: no such alias (aliases: {sorted(before) or 'none'}); register the "
                          f"candidate with --alias {from_alias} or set it with `deepship registry alias`")
    if before[from_alias] == before.get(to_alias):
        raise ConfigError(f"{name}: {from_alias} and {to_alias} both point at version {before[from_alias]}; "
                          "nothing to promote")
    candidate = registry.resolve(f"{name}:{before[from_alias]}")  # verified before anything is scored
    current = registry.resolve(f"{name}:{before[to_alias]}") if to_alias in before else None
    data = data or default_test_data(candidate)
    out = registry.promotion_dir(name)
    decision = judge(*score_pair(candidate, current, data, out, objective_overrides, n_resamples, latency_runs),
                     max_regression)
    decision.report_dir, decision.forced = out, force and not decision.promoted
    decision.promoted = decision.promoted or force
    details = {"candidate": decision.candidate, "current": decision.current, "diff": decision.diff,
               "diff_ci95": decision.diff_ci95, "max_regression": max_regression, "data": str(data),
               "reports": str(out)}
    with registry.lock(name):
        if registry.aliases(name) != before:
            raise ConfigError(f"{name}: aliases changed while the promotion was evaluated ({before} -> "
                              f"{registry.aliases(name)}); rerun the promotion")
        if decision.promoted:
            registry.set_alias(name, to_alias, candidate.version, event="promote", reason=decision.reason,
                               forced=decision.forced, details=details, actor=actor)
            decision.event = registry.events(name)[-1]
        else:
            decision.event = registry.log_event(name, {"event": "promote_refused", "alias": to_alias,
                                                       "from": before.get(to_alias), "to": candidate.version,
                                                       "reason": decision.reason, **details}, actor=actor)
    return decision


def default_test_data(candidate: VersionInfo) -> str:
    """The candidate's configured test set (data.test), when it is one plain source reachable from here."""
    from deepship.runtime.package import read_manifest

    sources = ((read_manifest(candidate.path).get("config") or {}).get("data") or {}).get("test") or []
    hint = "pass --data with a labeled file or folder both versions can be scored on"
    if len(sources) != 1:
        raise ConfigError(f"{candidate.name}:{candidate.version} records {'no' if not sources else len(sources)} "
                          f"test set{'s' if len(sources) > 1 else ''} (data.test); {hint}")
    source = sources[0]
    custom = [k for k in ("text_column", "label_column", "path_column") if source.get(k)]
    if custom or source.get("split", "train") != "train":
        raise ConfigError(f"{candidate.name}:{candidate.version}: its test set {source['path']} sets "
                          f"{custom or ['split']} per source; {hint}")
    path = source["path"]
    if ":" not in path.split("/")[0] and not Path(path).exists():  # demo:/hf: sources resolve themselves
        raise ConfigError(f"{candidate.name}:{candidate.version}: its test set {path} (data.test) is not found "
                          f"from {Path.cwd()}; {hint}")
    return path


def score_pair(candidate: VersionInfo, current: VersionInfo | None, data: str, out: Path,
               overrides: Sequence[str], n_resamples: int, latency_runs: int
               ) -> tuple[VersionInfo, dict[str, Any], VersionInfo | None, dict[str, Any] | None]:
    """The candidate's report (its gates, latency) and, with a current holder, the current's report with the
    candidate as its challenger (the paired comparison reads candidate - current)."""
    from deepship.evaluation.evaluate import EvaluateOptions, evaluate_package

    report = evaluate_package(candidate.path, data, out / "candidate", EvaluateOptions(
        overrides=overrides, latency_runs=latency_runs, n_resamples=n_resamples))
    if current is None:
        return candidate, report, None, None
    metric = report["objective"]["metric"]  # the candidate's objective decides what "better" means
    comparison = evaluate_package(current.path, data, out / "current", EvaluateOptions(
        compare=str(candidate.path), overrides=[f"objective.metric={metric}"], latency_runs=0,
        n_resamples=n_resamples))
    return candidate, report, current, comparison


def judge(candidate: VersionInfo, report: dict[str, Any], current: VersionInfo | None,
          comparison: dict[str, Any] | None, max_regression: float) -> PromotionDecision:
    metric, verdict = report["objective"]["metric"], report["verdict"]
    cand = {"version": candidate.version, "metric": metric, "value": report["metrics"].get(metric),
            "ci95": report["metrics"]["ci95"].get(metric),
            "latency_p95_ms": ((report.get("latency") or {}).get("batch_1") or {}).get("p95"),
            "gates": verdict["summary"]}
    problems = [f"gate failed: {g['name']} (measured {fmt(g['value'], '.4g')})"
                for g in verdict["gates"] if g["passed"] is False]
    if current is None:
        return decide(problems, f"{metric} v{candidate.version} {fmt(cand['value'])}, no current holder; "
                                f"gates: {verdict['summary']}", cand)
    comp = comparison["comparison"]
    diff, ci = comp["difference"], comp["paired_bootstrap"]["ci"]
    cur = {"version": current.version, "metric": metric, "value": comp["champion_value"],
           "ci95": comparison["metrics"]["ci95"].get(metric)}
    floor = -max_regression or 0.0  # no "-0.0000" in the message
    if diff is None or ci is None:
        problems.append(f"{metric} candidate - current is undefined on this data")
    elif not ci[0] > floor:
        problems.append(f"candidate - current 95% lower bound {ci[0]:+.4f} is not above {floor:+.4f} "
                        f"(--max-regression {max_regression:g})")
    summary = (f"{metric} candidate v{candidate.version} {fmt(cand['value'])} vs current v{current.version} "
               f"{fmt(cur['value'])}: difference {fmt(diff, '+.4f')}"
               + (f" [95% CI {ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
               + f", McNemar p={comp['mcnemar']['p_value']:.3g}; gates: {verdict['summary']}")
    return decide(problems, summary, cand, cur, diff, tuple(ci) if ci else None)


def decide(problems: list[str], summary: str, candidate: dict[str, Any], current: dict[str, Any] | None = None,
           diff: float | None = None, ci: tuple[float, float] | None = None) -> PromotionDecision:
    reason = f"{'; '.join(problems)} -- {summary}" if problems else summary
    return PromotionDecision(not problems, False, reason, candidate, current, diff, ci)


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "undefined" if value is None else format(value, spec)
