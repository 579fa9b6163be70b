"""Typed run configuration: YAML in, validated pydantic models out, `--set key=value` overrides.

Everything a run needs is validated here, once, before any data is read or any model is built.
Errors name the dotted key and say what is allowed. The YAML and `--set` helpers live in
`deepship.yamlconf`, which the torch-free server shares without loading this schema; `parse_yaml`,
`apply_overrides` and `validate_section` stay importable from here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from deepship.errors import ConfigError
from deepship.yamlconf import apply_overrides, format_validation_error, parse_yaml, read_yaml_mapping, validate_section  # noqa: F401

Task = Literal["text_classification", "image_classification"]
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]

DEMO_PREFIX = "demo:"


class _Section(BaseModel):
    # strict: "32" is not a number and "yes" is not a bool; extra: a typo is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


HF_PREFIX = "hf:"


def _check_source(value: str, info: ValidationInfo) -> str:
    """A source is an existing file/folder, `hf:NAME[:CONFIG]`, or a generated demo `demo:NAME/REST`."""
    if value.startswith(HF_PREFIX) or not _checking_paths(info):
        return value
    if value.startswith(DEMO_PREFIX):
        from deepship.data.demo import DEMOS  # local: the demo registry is only needed here

        name = value[len(DEMO_PREFIX) :].split("/", 1)[0]
        if name not in DEMOS:
            raise ValueError(f"unknown demo dataset '{name}'; choose one of {sorted(DEMOS)}")
        return value
    if not Path(value).exists():
        raise ValueError(
            f"'{value}' does not exist; give a folder or a CSV/JSONL/Parquet file "
            "(relative paths are read from the current directory)"
        )
    return value


def _checking_paths(info: ValidationInfo) -> bool:
    # A finished run's config is re-read without its data (export, evaluate on another host).
    return not (info.context or {}).get("skip_path_checks", False)


class SourceConfig(_Section):
    """One data source; `data.train` etc. take one or a list (concatenated)."""

    path: str = Field(min_length=1, description="folder, CSV/JSONL/Parquet file, hf:NAME[:CONFIG] or demo:NAME/...")
    split: str = Field("train", description="hf: sources: which split to load")
    text_column: str | None = Field(None, description="default: data.text_column")
    label_column: str | None = Field(None, description="default: data.label_column")
    path_column: str | None = Field(None, description="default: data.path_column")

    @field_validator("path")
    @classmethod
    def _source_exists(cls, value: str, info: ValidationInfo) -> str:
        return _check_source(value, info)


def _as_source_list(value: Any) -> Any:
    """`train: file.csv`, `train: {path: ...}` and `train: [a.csv, {path: b.jsonl}]` all become a list."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    return [{"path": item} if isinstance(item, str) else item for item in items]


class DataConfig(_Section):
    train: list[SourceConfig] = Field(description="image: class-per-folder dir or table; text: CSV/JSONL/Parquet")
    val: list[SourceConfig] | None = Field(None, description="optional; else a stratified val_fraction of train")
    test: list[SourceConfig] | None = Field(None, description="optional held-out set, evaluated after training")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="keep this stratified, seeded share of the "
                                  "training split (per class, at least one); smaller shares are subsets of larger")
    cv_folds: int | None = Field(None, ge=2, description="cross-validation: split train into this many stratified, "
                                                         "seeded folds (instead of val_fraction); null = off")
    cv_fold: int = Field(0, ge=0, description="cross-validation: the 0-based fold that validates; the others train")
    text_column: str = "text"
    label_column: str = "label"
    path_column: str = Field("path", description="image CSV column holding file paths")
    max_length: int = Field(128, ge=8, le=8192, description="text: tokens kept per input")
    truncation_side: Literal["right", "left"] = Field("right", description="text: which end loses tokens")
    pad_to_multiple_of: int = Field(16, ge=1, le=512, description="text: batch length rounding")
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers; null = auto")
    group_by_length: bool = Field(True, description="text: training batches of similar token lengths (less padding)")
    cache: bool = Field(False, description="image training: decode every training image once into a uint8 "
                                           "memory-mapped file under <out_dir>/.cache, reused by every epoch and run")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="image training: gpu = workers read bytes, the training device decodes and augments "
                            "the batch; auto = gpu with CUDA and mostly-JPEG training files")
    label_map: dict[str, str] = Field(default_factory=dict, description="rename/merge labels: {spelling: label}")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="abort when more samples are quarantined")
    min_per_class: int = Field(10, ge=1, description="warn when a class has fewer examples in a split")
    max_imbalance_ratio: float = Field(20.0, ge=1.0, description="warn when largest/smallest class exceeds it")
    min_image_size: int = Field(16, ge=1, description="images with a shorter side below this are quarantined")
    remove_leakage: bool = Field(True, description="drop val/test samples that duplicate a training sample")

    _sources_as_lists = field_validator("train", "val", "test", mode="before")(classmethod(
        lambda cls, value: _as_source_list(value)))

    @field_validator("cv_folds")
    @classmethod
    def _folds_replace_val(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("val") is not None:
            raise ValueError("cross-validation takes every validation fold from data.train, but data.val is set "
                             "too; drop data.val or data.cv_folds")
        return value

    @field_validator("cv_fold")
    @classmethod
    def _fold_exists(cls, value: int, info: ValidationInfo) -> int:
        if "cv_folds" not in info.data:  # data.cv_folds itself was invalid: that error says enough
            return value
        folds = info.data["cv_folds"]
        if folds is None and value != 0:
            raise ValueError("data.cv_fold selects a cross-validation fold; set data.cv_folds too")
        if folds is not None and value >= folds:
            raise ValueError(f"data.cv_fold is 0-based and must be below data.cv_folds={folds}")
        return value


class ModelConfig(_Section):
    backbone: str = Field("mobilenet_v2", min_length=1)
    pretrained: bool | str = Field(True, description="image: true (ImageNet), false, or weights path")
    image_size: int | None = Field(None, ge=16, le=1024, description="image: override backbone size")

    @field_validator("pretrained")
    @classmethod
    def _weights_file_exists(cls, value: bool | str, info: ValidationInfo) -> bool | str:
        if isinstance(value, str) and _checking_paths(info) and not Path(value).is_file():
            raise ValueError(f"weights file '{value}' not found; give a state_dict path, true or false")
        return value


class FinetuneConfig(_Section):
    """How the pretrained backbone is adapted: what trains when, at which learning rate, on what data."""

    strategy: Literal["full", "freeze", "freeze_then_unfreeze", "gradual", "auto"] = Field(
        "full", description="auto: pretrained image backbone on < 5,000 training images -> freeze_then_unfreeze "
                            "with backbone_lr = head LR x 0.1; otherwise full")
    freeze_bn: bool | Literal["auto"] = Field(
        "auto", description="true: backbone BatchNorms keep their pretrained running statistics while training; "
                            "auto = true when strategy auto picks its small-data recipe")
    head_init: Literal["auto", "random", "probe"] = Field(
        "auto", description="probe: the head starts as the linear probe fitted on the frozen pretrained features "
                            "(linear probing then fine-tuning); auto = probe when strategy auto picks its small-data "
                            "recipe and there are fewer than 10 training images per class")
    unfreeze_epoch: int = Field(1, ge=0, description="freeze_then_unfreeze/gradual: first epoch (0-based) "
                                                     "that trains backbone layers")
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between unfreezing the next layer group")
    head_lr: float | None = Field(None, gt=0.0, le=1.0, description="head learning rate; null = train.lr")
    backbone_lr: float | None = Field(None, gt=0.0, le=1.0, description="backbone learning rate; null = train.lr")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="each layer down gets lr x this")
    schedule: Literal["cosine", "linear", "constant", "onecycle"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of steps warming up (not onecycle)")
    class_weights: Literal["auto", "none"] | dict[str, float] = Field(
        "none", description="auto = inverse class frequency, normalized; or {class: weight}")
    sampler: Literal["none", "balanced"] = Field("none", description="balanced: sample classes equally often")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: Literal["none", "light", "standard", "strong"] = Field("standard", description="image augmentation")
    mixup: float = Field(0.0, ge=0.0, le=1.0, description="image: probability a batch is mixed with MixUp")
    cutmix: float = Field(0.0, ge=0.0, le=1.0, description="image: probability a batch is mixed with CutMix")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="EMA of weights, evaluated and checkpointed")
    linear_probe: bool = Field(True, description="image runs from pretrained weights: report a logistic regression "
                                                 "on the frozen backbone's features beside the model")

    @field_validator("cutmix")
    @classmethod
    def _mix_probabilities(cls, value: float, info: ValidationInfo) -> float:
        if value + info.data.get("mixup", 0.0) > 1.0:
            raise ValueError("mixup + cutmix must not exceed 1 (they are alternative batch treatments)")
        return value


class TrainConfig(_Section):
    max_epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1.0e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    accumulate_grad_batches: int = Field(1, ge=1)
    compile: bool = Field(False, description="torch.compile the network (checkpoint keys unchanged)")
    limit_train_batches: int | float | None = Field(None, gt=0, description="smoke runs: batches (int) or share")
    loggers: list[Literal["csv", "tensorboard", "mlflow"]] = Field(default_factory=lambda: ["csv"])
    resume: bool | Literal["auto"] | str = Field(False, description="auto/true: continue from last.ckpt; or a path")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs; null = off")
    seed: int = 0
    deterministic: bool = False
    accelerator: Accelerator = "auto"
    precision: Precision = "auto"
    out_dir: str = "checkpoints"
    run_name: str = "run"
    overwrite: bool = Field(False, description="replace an existing run directory")
    checkpoint_every_n_steps: int | None = Field(None, ge=1, description="also write last.ckpt every N optimizer "
                                                                         "steps (mid-epoch); null = epoch ends only")
    nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/Inf training loss: stop with an error, "
                                                                   "or skip that batch's update")
    sdpa_backend: Literal["auto", "default", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="text models' attention kernel: auto = the fastest measured on a real batch at the start "
                            "of training; default = PyTorch's per-call choice; or one backend")
    devices: int | Literal["auto"] | list[int] = Field(1, description="devices per node (Lightning `devices`)")
    num_nodes: int = Field(1, ge=1, description="machines (Lightning `num_nodes`)")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="auto: one device; ddp / fsdp: "
                                                                         "torch.distributed through Lightning")

    @field_validator("devices")
    @classmethod
    def _some_devices(cls, value: int | str | list[int]) -> int | str | list[int]:
        if value == [] or (isinstance(value, int) and value < 1):
            raise ValueError("give a device count >= 1, 'auto', or a list of device indices")
        return value

    @model_validator(mode="after")
    def _fsdp_clipping(self) -> "TrainConfig":
        if self.strategy == "fsdp" and self.grad_clip is not None:
            # Lightning's FSDP precision plugin cannot clip (it raises at the first step); say so now
            raise ValueError("strategy fsdp cannot clip gradients through Lightning; set train.grad_clip: null")
        return self

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"'{value}' is not a plain directory name; use letters, digits, . _ -")
        return value


ObjectiveMetric = Literal["accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc", "pr_auc"]


class ObjectiveConfig(_Section):
    """What the model is for: the metric that matters and the gates `evaluate` enforces (exit 4), plus
    the confidence thresholds export writes into the package (fitted on validation predictions)."""

    metric: ObjectiveMetric = Field("macro_f1", description="the headline metric the gate and reports lead with")
    min: float | None = Field(None, ge=0.0, le=1.0, description="gate: the metric must reach this; null = no gate")
    latency_budget_ms: float | None = Field(None, gt=0.0, description="gate: batch-1 p95 latency of the package")
    target_precision: float | None = Field(None, gt=0.0, le=1.0,
                                           description="abstain below the confidence that reaches this precision")
    target_coverage: float | None = Field(None, gt=0.0, le=1.0,
                                          description="or: abstain below the confidence that answers this share")
    per_class_thresholds: bool = Field(False, description="one confidence threshold per predicted class")
    cost_fp: float | None = Field(None, ge=0.0, description="binary: cost of a false positive")
    cost_fn: float | None = Field(None, ge=0.0, description="binary: cost of a false negative")

    @model_validator(mode="after")
    def _consistent(self) -> "ObjectiveConfig":
        if self.target_precision is not None and self.target_coverage is not None:
            raise ValueError("target_precision and target_coverage are alternatives; set one of them")
        if (self.cost_fp is None) != (self.cost_fn is None):
            raise ValueError("cost_fp and cost_fn go together; set both or neither")
        target = "target_precision" if self.target_precision is not None else \
            "target_coverage" if self.target_coverage is not None else None
        if self.cost_fp is not None and target is not None:
            # the cost rule picks the class, a confidence threshold fitted on the top class would not
            # hold for that pick: the package would promise a precision/coverage it does not deliver
            raise ValueError(f"cost_fp/cost_fn and {target} are alternatives (a cost threshold moves the "
                             f"decisions a {target} threshold is fitted on); set one of them")
        if self.per_class_thresholds and self.target_precision is None:
            raise ValueError("per_class_thresholds needs objective.target_precision")
        return self


WINDOW_PATTERN = r"[1-9][0-9]*[smhd]"


class MonitorConfig(_Section):
    """How `monitor` cuts the current data into windows and when a window alerts (exit 3)."""

    window: int | str = Field(1000, description="inputs per window, or a duration: 30m, 6h, 1d (needs ts)")
    min_window: int = Field(100, ge=10, description="smaller windows are reported but never alert")
    alpha: float = Field(0.01, gt=0.0, lt=0.5, description="family-wise false-alarm rate per window (Holm)")
    psi_limit: float = Field(0.1, gt=0.0, description="drift must also be this large (PSI) to alert")
    limits: dict[str, float] = Field(default_factory=dict, description="per-signal effect limits, e.g. {confidence: 0.2}")
    max_accuracy_drop: float = Field(0.05, ge=0.0, le=1.0,
                                     description="with labels: alert when accuracy's CI is below reference - this")
    embeddings: bool = Field(True, description="MMD on penultimate embeddings when the current data has them")

    @field_validator("window")
    @classmethod
    def _window(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a count window must be at least 1")
            return value
        if not re.fullmatch(WINDOW_PATTERN, value):
            raise ValueError(f"'{value}' is neither a count nor a duration like 30m, 6h or 1d")
        return value


class Config(_Section):
    task: Task
    data: DataConfig
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    monitor: MonitorConfig = MonitorConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.train.run_name

    @property
    def modality(self) -> str:
        """"image" or "text": the inputs this task reads (the name modality objects and baselines use)."""
        return self.task.removesuffix("_classification")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a YAML config; any problem raises ConfigError (exit 2)."""
    example = "a YAML file such as configs/quickstart_text.yaml"
    raw = read_yaml_mapping(Path(path), "--config", example, "with keys task, data, model, train")
    apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, Config)}") from None
