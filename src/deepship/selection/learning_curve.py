"""`deepship learning-curve`: train on growing, nested shares of the training data and say whether more
data is likely to help.

Every run is an ordinary training run with `data.train_fraction` set (same validation set for every share).
Its best checkpoint is scored on its own training subset and on validation with the objective metric and a
95% bootstrap interval (the evaluation report's code). The verdict compares the validation gain over the
last step, per doubling of the training data, with its noise; docs/learning_curves.md defines it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from deepship.config import Config, load_config
from deepship.errors import ConfigError
from deepship.selection.learning_curve_report import Z95, write_curve

if TYPE_CHECKING:
    import torch

FRACTIONS_HINT = "give increasing shares in (0, 1] separated by commas, e.g. 0.1,0.25,0.5,1.0"


@dataclass(frozen=True)
class CurveOptions:
    fractions: tuple[float, ...]
    seeds: int = 1  # runs per fraction, at train.seed, train.seed + 1, ...
    out: Path | None = None  # default: <train.out_dir>/<train.run_name>-learning-curve
    n_resamples: int = 1000  # bootstrap resamples per interval


def parse_fractions(text: str) -> tuple[float, ...]:
    """'0.1,0.25,1' -> (0.1, 0.25, 1.0); at least two, strictly increasing, each in (0, 1]."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--fractions: '{item.strip()}' is not a number; {FRACTIONS_HINT}") from None
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"--fractions: {item.strip()} is not in (0, 1]; {FRACTIONS_HINT}")
        if values and value <= values[-1]:
            raise ConfigError(f"--fractions: {item.strip()} does not exceed {values[-1]:g}; {FRACTIONS_HINT}")
        values.append(value)
    if len(values) < 2:
        raise ConfigError(f"--fractions: a curve needs at least two points; {FRACTIONS_HINT}")
    return tuple(values)


def default_out(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / f"{cfg.train.run_name}-learning-curve"


def plan_runs(config: str | Path, overrides: Sequence[str], options: CurveOptions, out: Path
              ) -> list[tuple[float, int, Config]]:
    """(fraction, seed, config) per run; run directories out/runs/f<fraction>_s<seed>."""
    base = load_config(config, overrides)
    plans = []
    for fraction in options.fractions:
        for seed in range(base.train.seed, base.train.seed + options.seeds):
            # JSON strings are YAML strings: a path stays a string whatever characters it holds
            cfg = load_config(config, [*overrides, f"data.train_fraction={fraction!r}", f"train.seed={seed}",
                                       f"train.out_dir={json.dumps(str(out / 'runs'))}",
                                       f"train.run_name=f{fraction:g}_s{seed}"])
            plans.append((fraction, seed, cfg))
    return plans


def train_or_reuse(cfg: Config) -> Path:
    """A finished run with this exact config is reused (an interrupted curve continues); else fit."""
    from deepship.run import read_run_config
    from deepship.training import fit

    run_dir = cfg.run_dir
    if (run_dir / "metrics.json").is_file() and (run_dir / "config.yaml").is_file():
        if read_run_config(run_dir).model_dump(mode="json") == cfg.model_dump(mode="json"):
            print(f"reusing the finished run {run_dir}", flush=True)
            return run_dir
    return fit(cfg)


# ------------------------------------------------------------------------------------- scoring
def predict_splits(run_dir: Path) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """Logits (N, C) and targets (N,) of best.ckpt on the run's training subset and its validation set, both
    with evaluation preprocessing (no augmentation)."""
    import torch

    from deepship.data.datamodule import ClassificationData
    from deepship.data.split import Splits, load_splits
    from deepship.run import load_run
    from deepship.training import evaluation_trainer

    run = load_run(run_dir)
    splits = load_splits(run.config)  # the run's own config: the same subset, hold-out and classes
    # the training subset doubles as the "test" split: that loader preprocesses as for evaluation
    data = ClassificationData(run.config, Splits(splits.train, splits.val, splits.train, run.classes), run.backbone)
    data.setup()
    trainer = evaluation_trainer(run.config)
    out = {}
    for name, loader in (("train", data.test_dataloader()), ("val", data.val_dataloader())):
        outputs = trainer.predict(run.module, dataloaders=loader)
        out[name] = torch.cat([o[0].cpu() for o in outputs]), torch.cat([o[1].cpu() for o in outputs])
    return out


def score_logits(logits: "torch.Tensor", targets: "torch.Tensor", cfg: Config, classes: Sequence[str],
                 n_resamples: int) -> dict[str, Any]:
    """The objective metric of the argmax decisions and its 95% percentile bootstrap interval."""
    from deepship.evaluation.report import Decisions, metrics_section

    metrics = metrics_section(Decisions(logits, 1.0, None, classes), targets, classes, cfg.objective, n_resamples)
    metric = cfg.objective.metric
    return {"value": metrics[metric], "ci95": metrics["ci95"][metric], "n": int(targets.shape[0])}


def score_run(run_dir: Path, cfg: Config, fraction: float, seed: int, n_resamples: int) -> dict[str, Any]:
    classes = json.loads((run_dir / "labels.json").read_text())
    scored = {name: score_logits(logits, targets, cfg, classes, n_resamples)
              for name, (logits, targets) in predict_splits(run_dir).items()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"fraction": fraction, "seed": seed, "n_train": scored["train"]["n"], **scored,
            "train_time_s": metrics.get("train_time_s"), "epochs": metrics.get("epochs"), "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------- verdict
def standard_error(values: Sequence[float], intervals: Sequence[Sequence[float] | None]) -> float:
    """Of a point's mean over seeds: the bootstrap part (a 95% interval's half-width / 1.96, averaged in
    quadrature) and, with several seeds, the seed-to-seed spread, both divided by the number of seeds."""
    k = len(values)
    boot = [((hi - lo) / (2 * Z95)) ** 2 for lo, hi in (i for i in intervals if i is not None)]
    boot_var = sum(boot) / len(boot) if boot else 0.0
    mean = sum(values) / k
    seed_var = sum((v - mean) ** 2 for v in values) / (k - 1) if k > 1 else 0.0
    return math.sqrt(boot_var / k + seed_var / k)


def summarize_point(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One fraction's runs (one per seed) -> mean and standard error of the train and val metric."""
    point: dict[str, Any] = {"fraction": runs[0]["fraction"], "n_train": runs[0]["n_train"], "seeds": len(runs)}
    for split in ("train", "val"):
        values = [r[split]["value"] for r in runs]
        point[split] = {"value": sum(values) / len(values),
                        "se": standard_error(values, [r[split]["ci95"] for r in runs])}
    return point


def judge(points: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Is the validation gain over the last step, per doubling of the training samples, larger than 1.96 of its
    standard errors? The two points' errors add in quadrature (independent: conservative, as both share the
    validation set)."""
    prev, last = points[-2], points[-1]
    doublings = math.log2(last["n_train"] / prev["n_train"])
    if doublings <= 0:
        return {"more_data_helps": None, "text": f"the last two fractions train on the same {last['n_train']} "
                                                 "samples; use fractions further apart"}
    gain = (last["val"]["value"] - prev["val"]["value"]) / doublings
    se = math.hypot(last["val"]["se"], prev["val"]["se"]) / doublings
    helps = gain - Z95 * se > 0
    step = f"{prev['n_train']} -> {last['n_train']} training samples"
    if helps:
        text = (f"more data is likely to help: validation {metric} rose {gain:+.4f} per doubling over the last step "
                f"({step}), more than its noise (1.96 x SE = {Z95 * se:.4f})")
    else:
        text = (f"more data is unlikely to help much: validation {metric} changed {gain:+.4f} per doubling over the "
                f"last step ({step}), within its noise (1.96 x SE = {Z95 * se:.4f})")
    return {"more_data_helps": helps, "gain_per_doubling": gain, "se_per_doubling": se, "doublings": doublings,
            "text": text}


def learning_curve(config: str | Path, overrides: Sequence[str], options: CurveOptions) -> dict[str, Any]:
    """Train every (fraction, seed), score, judge, and write learning_curve.{json,csv,html}; returns the result."""
    started = time.perf_counter()
    out = Path(options.out) if options.out is not None else default_out(load_config(config, overrides))
    plans = plan_runs(config, overrides, options, out)  # every config validated before the first run
    runs = []
    for fraction, seed, cfg in plans:
        runs.append(score_run(train_or_reuse(cfg), cfg, fraction, seed, options.n_resamples))
    points = [summarize_point([r for r in runs if r["fraction"] == f]) for f in options.fractions]
    metric = plans[0][2].objective.metric
    result = {"metric": metric, "config": str(config), "overrides": list(overrides), "seeds": options.seeds,
              "points": points, "runs": runs, "verdict": judge(points, metric),
              "wall_time_s": round(time.perf_counter() - started, 1)}
    write_curve(out, result)
    result["out"] = str(out)
    return result
