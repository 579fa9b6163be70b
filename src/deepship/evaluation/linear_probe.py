"""The linear probe: a logistic regression on a frozen pretrained image backbone's pooled features.

It is the cheapest strong alternative to fine-tuning: no gradient reaches the backbone, so whatever
fine-tuning adds on top of it is what the fine-tuned model has to show. The features are the input of
the backbone's classification head (its global-average-pooled features), computed with the evaluation
preprocessing (resize, center crop, normalize; no augmentation) that the model and its package use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from deepship.config import Config
from deepship.errors import ConfigError
from deepship.models.backbones import Backbone, build_backbone, classification_head
from deepship.runtime.predictor import batched, progress

C_GRID = (0.1, 1.0, 10.0)  # inverse L2 strength, chosen by cross-validation on the training split
CV_FOLDS = 5  # at most; fewer when the smallest class has fewer training examples
MAX_ITER = 2000  # lbfgs on standardized features of separable classes needs more than sklearn's 100
BATCH_SIZE = 32

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


def require_pretrained(cfg: Config) -> None:
    """A probe on random features measures nothing: refuse a config without pretrained weights, and say so
    before any work when its weights file is not on this host (a package may come from another machine)."""
    weights = cfg.model.pretrained
    if weights is False:
        raise ConfigError("model.pretrained is false: a linear probe needs a pretrained backbone; use a model "
                          "trained from pretrained weights (model.pretrained: a weights file, or true for ImageNet)")
    if isinstance(weights, str) and not Path(weights).is_file():
        raise ConfigError(f"model.pretrained: weights file '{weights}' not found on this host; the linear probe "
                          "needs the backbone the model was trained from: copy it to that path")


def frozen_backbone(cfg: Config) -> Backbone:
    """The config's image backbone with its pretrained weights, in eval mode. Built by the same builder as
    the model, so its preprocessing spec is the one the run and its package use."""
    require_pretrained(cfg)
    with torch.random.fork_rng(devices=[]):  # its random init (then overwritten) must not shift a run's RNG stream
        backbone = build_backbone(cfg.task, cfg.model, cfg.data, num_classes=1)  # the head is never used
    backbone.net.eval().requires_grad_(False)
    return backbone


def extract_features(backbone: Backbone, paths: Sequence[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """(N, D) float32: what the backbone feeds its classification head for each image."""
    from deepship.data.datamodule import eval_batch  # images -> tensors exactly as validation reads them

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = backbone.net.to(device)
    captured: list[torch.Tensor] = []
    handle = classification_head(net).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].flatten(1).float().cpu()))
    update = progress(len(paths), enabled=True)
    try:
        with torch.inference_mode():
            for batch in batched(paths, batch_size):
                net(**{k: v.to(device) for k, v in eval_batch(backbone, batch).items()})
                update(len(batch))
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


def fit_probe(features: np.ndarray, labels: Sequence[str], seed: int) -> Pipeline:
    """Standardize, then a multinomial logistic regression with C from `C_GRID` chosen by seeded stratified
    k-fold accuracy; refitted on all of `features`. Returns the fitted sklearn pipeline."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ConfigError("the linear probe needs scikit-learn; pip install 'deepship[train]'") from None
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
    folds = min(CV_FOLDS, min(Counter(labels).values()))
    if folds < 2:  # a class with one example cannot be split: no choice to make, take the middle of the grid
        return pipeline.set_params(logisticregression__C=C_GRID[1]).fit(features, list(labels))
    search = GridSearchCV(pipeline, {"logisticregression__C": list(C_GRID)},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return search.fit(features, list(labels)).best_estimator_


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe with the frozen backbone it reads (its own copy: fine-tuning the model leaves it as it is)."""

    backbone: Backbone
    pipeline: Pipeline

    @property
    def C(self) -> float:  # noqa: N802 (scikit-learn's name for it)
        return float(self.pipeline[-1].C)

    def predict(self, paths: Sequence[str]) -> list[str]:
        """Label strings for `paths` (an empty list for none)."""
        if not paths:
            return []
        return [str(y) for y in self.pipeline.predict(extract_features(self.backbone, paths))]

    def as_linear(self, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe as one Linear layer on the raw pooled features, rows in `classes` order: weight (C, D) and
        bias (C,) with the standardization folded in, so W x + b gives the probe's decision function."""
        scaler, regression = self.pipeline[0], self.pipeline[-1]
        order = [list(regression.classes_).index(c) for c in classes]
        coef, intercept = regression.coef_, regression.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row, the log-odds of classes_[1]
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        weight = coef[order] / scaler.scale_
        bias = intercept[order] - weight @ scaler.mean_
        return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)


def fit_linear_probe(cfg: Config, train_paths: Sequence[str], train_labels: Sequence[str]) -> LinearProbe:
    """The config's frozen pretrained backbone and the probe fitted on its features of the training images."""
    backbone = frozen_backbone(cfg)
    return LinearProbe(backbone, fit_probe(extract_features(backbone, train_paths), train_labels, cfg.train.seed))


def probe_predict(cfg: Config, train_paths: Sequence[str], train_labels: Sequence[str],
                  paths: Sequence[str]) -> tuple[list[str], float]:
    """Fit the probe on the training images, predict label strings for `paths`; returns them and the C chosen."""
    probe = fit_linear_probe(cfg, train_paths, train_labels)
    return probe.predict(paths), probe.C


PROBE_MODALITY = "image"  # it probes a CNN's pooled features


def probe_applies(cfg: Config) -> bool:
    """Whether a run of this config can have a linear probe at all (its inputs are the probe's)."""
    return cfg.modality == PROBE_MODALITY


def probe_skip_reason(cfg: Config) -> str | None:
    """Why a training run reports no linear probe, or None when it does."""
    if not cfg.finetune.linear_probe:
        return "finetune.linear_probe is false"
    if not probe_applies(cfg):
        return f"the linear probe reads {PROBE_MODALITY} inputs; this is a {cfg.modality} run"
    if cfg.model.pretrained is False:
        return "model.pretrained is false: there is no pretrained backbone to probe"
    return None
