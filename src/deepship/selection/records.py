"""One row of a sweep's leaderboard: what the sweep measured for a trial, whatever its fate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TrialState = Literal["complete", "pruned", "failed", "over_budget", "running"]


@dataclass
class TrialRecord:
    number: int  # Optuna's trial number; the run directory is <sweep>/trials/<number:03d>/
    state: TrialState
    params: dict[str, Any] = field(default_factory=dict)  # the sampled config keys, e.g. {"train.lr": 3e-4}
    value: float | None = None  # the objective on validation (mean over folds with cross-validation)
    value_std: float | None = None  # standard deviation over folds; None without cross-validation
    interval: tuple[float, float] | None = None  # 95% bootstrap interval of the objective on validation
    latency_p95_ms: float | None = None  # batch-1 onnxruntime p95 of the untrained architecture on this host
    param_count: int | None = None
    onnx_bytes: int | None = None
    train_time_s: float | None = None
    epochs: int | None = None  # epochs actually trained (summed over folds)
    backbone: str | None = None  # model.backbone of the trial
    run_dir: str | None = None
    reason: str | None = None  # one line: why it failed, was pruned or is over budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
