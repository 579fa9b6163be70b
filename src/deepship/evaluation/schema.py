"""The documented shape of report.json. `docs/report.schema.json` is generated from these models
(`python -m deepship.evaluation.schema > docs/report.schema.json`); a test keeps the two equal and
validates real reports against the file. Sections may grow keys (extra allowed); none may vanish."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class Gate(_Part):
    name: str
    kind: Literal["metric", "latency"]
    value: Optional[float]
    limit: float
    passed: Optional[bool] = Field(description="null: not measured in this report")


class Verdict(_Part):
    passed: Optional[bool] = Field(description="null when no gate applies")
    summary: str
    gates: list[Gate]


class PerClass(_Part):
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(_Part):
    n: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    macro_precision: float
    macro_recall: float
    roc_auc: Optional[float] = Field(description="null when the data holds one class")
    pr_auc: Optional[float]
    log_loss: float
    per_class: dict[str, PerClass]
    confusion_matrix: list[list[int]] = Field(description="rows: true class, columns: predicted, label order")
    ci95: dict[str, Optional[list[float]]] = Field(description="percentile bootstrap intervals, [lo, hi]")


class Bin(_Part):
    lo: float
    hi: float
    count: int
    confidence: Optional[float] = Field(description="null: empty bin")
    accuracy: Optional[float]


class CalibrationPart(_Part):
    ece: float
    mce: float
    nll: float
    n_bins: int
    bins: list[Bin]


class Calibration(_Part):
    temperature: float
    fitted_on: Optional[str]
    before: CalibrationPart
    after: CalibrationPart


class RiskCoverage(_Part):
    coverage: list[float]
    risk: list[float]
    threshold: list[float]


class Selective(_Part):
    thresholds: Optional[dict[str, Any]] = Field(description="the package's rule (deepship.runtime.predictor.decide)")
    answered: int
    coverage: float
    precision_answered: Optional[float]
    risk_coverage: RiskCoverage
    at_target_on_this_data: Optional[dict[str, Any]]
    cost: Optional[dict[str, Any]]


class LatencyStats(_Part):
    runs: int
    p50: float
    p95: float
    p99: float


class Latency(_Part):
    host: str
    batch_1: LatencyStats


class Baseline(_Part):
    name: str
    accuracy: float
    macro_f1: float
    train_samples: int


class Comparison(_Part):
    metric: str
    champion_value: Optional[float]
    challenger_value: Optional[float]
    difference: Optional[float]
    paired_bootstrap: dict[str, Any]
    mcnemar: dict[str, Any]
    conclusion: str


class Report(_Part):
    schema_version: Literal[1]
    created_at: str
    verdict: Verdict
    model: dict[str, Any] = Field(description="name, task, labels, model_version, precision, package or run dir")
    data: dict[str, Any] = Field(description="source, split, n, class_counts")
    objective: dict[str, Any] = Field(description="the objective config section the gates came from")
    metrics: Metrics
    calibration: Calibration
    selective: Selective
    latency: Optional[Latency]
    baseline: Optional[Baseline]
    comparison: Optional[Comparison]
    history: Optional[list[dict[str, Any]]] = Field(description="history.csv rows of the run, when available")
    notes: list[str]


def report_schema() -> dict[str, Any]:
    return Report.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(report_schema(), indent=2))
