"""`deepship retrain`: labeled production data -> a challenger trained, exported, registered, and promoted
only when the registry's gate finds it better on the most recent labeled inputs.

Steps, each one skipped when a previous run with the same arguments already finished it, so the command
is safe to repeat (from cron, or `monitor --on-alert`): read and check the new data (nothing is written
before every input check passed), write the new training file and the decision set, train (resumes
from last.ckpt), export (parity gate), then, under the registry's lock, register as `challenger` and
promote to `production` through the registry's gate. A failed training or export registers nothing.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import ValidationError

from deepship.config import Config, SourceConfig, apply_overrides
from deepship.errors import ConfigError
from deepship.files import exclusive
from deepship.retrain_data import (
    LabeledBatch,
    check_decision_classes,
    materialize_images,
    per_class,
    read_labeled_log,
    recent_holdout,
    remove_leakage,
    time_range,
    training_samples,
    write_table,
)
from deepship.yamlconf import format_validation_error

RUN_NAME, PACKAGE_DIR = "run", "package"
TRAIN_FILE, DECISION_FILE = "new_labeled.csv", "decision_set.csv"
CHALLENGER, PRODUCTION = "challenger", "production"
EXIT_PROMOTED, EXIT_REFUSED = 0, 4


@dataclass(frozen=True)
class RetrainOptions:
    out: Path
    log: Path
    labels: Path
    champion: str | None = None  # registry:NAME@ALIAS or NAME:VERSION
    champion_package: Path | None = None  # or a package (adopted as NAME@production when NAME has none)
    champion_run: Path | None = None  # the package's run directory (its config.yaml); default: the manifest's config
    name: str | None = None  # with champion_package: the registry name
    registry: str | None = None
    inputs: Path | None = None  # the file the logged predictions were made on (logs without raw inputs)
    data: Sequence[str] = ()  # more labeled files, any format training reads
    holdout: float = 0.2
    overrides: Sequence[str] = ()
    lock_timeout: float = 60.0
    actor: str | None = None


@dataclass(frozen=True)
class Champion:
    name: str
    version: int | None  # None: a package the registry does not hold yet
    package: Path
    sha256: str
    config: Config


@dataclass
class Outcome:
    """What the report is built from."""

    champion: Champion
    data: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    package: Path | None = None
    version: int | None = None
    decision: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the champion
def check_options(options: RetrainOptions) -> None:
    if (options.champion is None) == (options.champion_package is None):
        raise ConfigError("give the champion as --champion registry:NAME@production, or as --champion-package PKG "
                          "--name NAME (not both)")
    if options.champion_package is not None and not options.name:
        raise ConfigError("--champion-package needs --name: the registry name the challenger is registered under")
    if not 0.0 < options.holdout < 1.0:
        raise ConfigError(f"--holdout {options.holdout:g}: give the share held out as the decision set, in (0, 1)")
    if options.lock_timeout < 0:
        raise ConfigError(f"--lock-timeout {options.lock_timeout:g}: give seconds to wait, 0 or more")


def champion_config(package: Path, run_dir: Path | None) -> Config:
    """The champion's training config: its run's config.yaml when given, else the one its package records."""
    from deepship.run import read_run_config
    from deepship.runtime.package import read_manifest

    if run_dir is not None:
        return read_run_config(run_dir)
    return Config.model_validate(read_manifest(package)["config"], context={"skip_path_checks": True})


def resolve_champion(reg: Any, options: RetrainOptions) -> Champion:
    """The version to beat. A --champion-package the registry does not know yet gets version None: it is
    registered as NAME@production only at the gate, so bad input leaves the registry untouched."""
    from deepship.registry import parse_ref
    from deepship.runtime.package import read_manifest

    if options.champion is not None:
        ref = parse_ref(options.champion)
        if ref.alias is None and ref.version is None:
            raise ConfigError(f"--champion {options.champion}: name the version to beat, e.g. {ref.name}@production")
        info = reg.resolve(ref)
        return Champion(info.name, info.version, Path(info.path), info.sha256,
                        champion_config(Path(info.path), options.champion_run))
    name, package = parse_ref(options.name).name, options.champion_package
    sha = read_manifest(package)["manifest_sha256"]
    version = reg.alias_target(name, PRODUCTION) if name in reg.models() else None
    if version is not None and reg.resolve(f"{name}:{version}").sha256 != sha:
        raise ConfigError(f"--champion-package {package}: {name}@{PRODUCTION} is another package (version "
                          f"{version}); retrain against it with --champion registry:{name}@{PRODUCTION}")
    return Champion(name, version, package, sha, champion_config(package, options.champion_run))


def adopt_champion(reg: Any, outcome: "Outcome", actor: str | None) -> None:
    """Register a --champion-package as NAME@production (under the caller's lock) and record its version."""
    c = outcome.champion
    info = reg.register(c.package, c.name, alias=PRODUCTION, lineage={"adopted_by": "deepship retrain"}, actor=actor)
    outcome.champion = replace(c, version=info.version)
    outcome.lineage["parent"]["version"] = info.version


# ------------------------------------------------------------------------------ configuration
def challenger_config(champion: Config, extra: Sequence[str], out: Path, overrides: Sequence[str]) -> Config:
    """The champion's config, --set applied, the extra training sources added, training into OUT/run with
    train.resume=auto (a killed retrain continues from last.ckpt when rerun)."""
    raw = champion.model_dump(mode="json")
    apply_overrides(raw, overrides)
    raw["data"]["train"] = [*raw["data"]["train"], *({"path": p} for p in extra)]
    raw["train"].update(out_dir=str(out), run_name=RUN_NAME, resume="auto")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"the champion's config for retraining: {format_validation_error(exc, Config)}") from None


# ------------------------------------------------------------------------------------ new data
def read_new_data(champion: Champion, options: RetrainOptions) -> tuple[LabeledBatch, LabeledBatch, LabeledBatch]:
    """(all labeled, to train on, decision set), every input check done, nothing written."""
    from deepship.runtime.predictor import Predictor

    predictor = Predictor.load(champion.package)
    batch = read_labeled_log(options.log, options.labels, predictor.labels, predictor.modality, options.inputs)
    train_rows, held_rows = recent_holdout(batch.ts, len(batch), options.holdout)
    new, decision = batch.take(train_rows), batch.take(held_rows)
    check_decision_classes(batch, decision, options.holdout)
    return batch, new, decision


def write_new_data(base: Config, batch: LabeledBatch, new: LabeledBatch, decision: LabeledBatch,
                   options: RetrainOptions) -> tuple[Config, Path, dict[str, Any]]:
    """The training file and the decision set (leaked inputs removed) in OUT; the config that trains on it."""
    if batch.encoded:
        new, decision = (materialize_images(b, options.out / "images" / part)
                         for b, part in ((new, "train"), (decision, "decision")))
    decision, leakage = remove_leakage(decision, training_samples(base, base.data.train, new), base)
    check_decision_classes(batch, decision, options.holdout)
    d = base.data
    column = d.text_column if base.task == "text_classification" else d.path_column
    train_file = write_table(options.out / TRAIN_FILE, new, column, d.label_column)
    decision_file = write_table(options.out / DECISION_FILE, decision, column, d.label_column)
    data = base.data.model_copy(update={"train": [*d.train, SourceConfig(path=str(train_file))]})
    classes = sorted(set(batch.labels))
    summary = {"log": str(options.log), "labels": str(options.labels), "inputs": options.inputs and str(options.inputs),
               "labeled": len(batch), "ordered_by": "log order (no timestamps)" if batch.ts is None else "ts",
               "extra_sources": list(options.data),
               "new_training": {"file": str(train_file), "n": len(new), "per_class": per_class(new.labels, classes)},
               "decision_set": {"file": str(decision_file), "n": len(decision),
                                "per_class": per_class(decision.labels, classes), "time_range": time_range(decision),
                                "leakage_removed": leakage}}
    return base.model_copy(update={"data": data}), decision_file, summary


# ----------------------------------------------------------------------------------- the steps
@contextmanager
def workdir_lock(out: Path) -> Iterator[None]:
    """One retrain per work directory: a second one started meanwhile would train into the same run."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(out / ".retrain.lock", wait=False):
            yield
    except BlockingIOError:
        raise ConfigError(f"--out {out}: another retrain is working in it; wait for it or use another "
                          "--out") from None


def train_challenger(cfg: Config) -> Path:
    """fit(), or the finished run of an earlier retrain with the same settings."""
    from deepship.run import read_run_config, unsafe_changes

    run_dir = cfg.run_dir
    if (run_dir / "metrics.json").is_file():
        changes = unsafe_changes(read_run_config(run_dir).model_dump(mode="json"), cfg.model_dump(mode="json"))
        if changes:
            raise ConfigError(f"--out {cfg.train.out_dir}: holds a finished retrain with other settings "
                              f"({'; '.join(changes[:4])}); use a new --out")
        return run_dir
    from deepship.training import fit

    return fit(cfg)


def export_challenger(run_dir: Path, package: Path) -> Path:
    """Export through the parity gate; a package already published here by an earlier run is kept."""
    from deepship.export import export_package

    if (package / "package.json").is_file():
        return package
    return export_package(run_dir, package)


def register_and_promote(reg: Any, outcome: Outcome, decision_file: Path, options: RetrainOptions) -> Any:
    """Under the model's lock: register the package as `challenger` (once), then the registry's gate."""
    from deepship.registry.promote import promote
    from deepship.runtime.package import read_manifest

    name, sha = outcome.champion.name, read_manifest(outcome.package)["manifest_sha256"]
    with reg.lock(name, timeout=options.lock_timeout):
        if outcome.champion.version is None:
            adopt_champion(reg, outcome, options.actor)
        known = [v for v in reg.versions(name) if v.sha256 == sha]
        info = known[-1] if known else reg.register(outcome.package, name, alias=CHALLENGER,
                                                    lineage=outcome.lineage, actor=options.actor)
        outcome.version = info.version
        if reg.alias_target(name, PRODUCTION) == info.version:
            return None  # an earlier run of this retrain promoted it already
        if reg.alias_target(name, CHALLENGER) != info.version:
            reg.set_alias(name, CHALLENGER, info.version, reason="retrain", actor=options.actor)
        return promote(reg, name, CHALLENGER, PRODUCTION, data=str(decision_file), actor=options.actor)


def lineage(champion: Champion, cfg: Config, data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"parent": {"name": champion.name, "version": champion.version, "sha256": champion.sha256},
            "produced_by": "deepship retrain", "run_dir": str(run_dir.resolve()),
            "data_fingerprint": metrics.get("data_fingerprint"),
            "training_sources": [s.path for s in cfg.data.train],
            "new_labeled": {k: data[k] for k in ("log", "labels", "new_training", "decision_set")}}


def decision_dict(decision: Any) -> dict[str, Any]:
    if decision is None:
        return {"promoted": True, "forced": False, "reason": "already production (promoted by an earlier run of "
                "this retrain)", "candidate": None, "current": None, "diff": None, "diff_ci95": None}
    return {"promoted": decision.promoted, "forced": decision.forced, "reason": decision.reason,
            "candidate": decision.candidate, "current": decision.current, "diff": decision.diff,
            "diff_ci95": None if decision.diff_ci95 is None else list(decision.diff_ci95)}


def report_fields(outcome: Outcome, code: int) -> dict[str, Any]:
    c = outcome.champion
    return {"exit_code": code, "decision": outcome.decision,
            "champion": {"name": c.name, "version": c.version, "package": str(c.package), "sha256": c.sha256},
            "challenger": {"name": c.name, "version": outcome.version, "run_dir": str(outcome.run_dir),
                           "package": str(outcome.package)},
            "data": outcome.data, "lineage": outcome.lineage}


def run_retrain(options: RetrainOptions) -> tuple[int, dict[str, Any]]:
    """The whole loop; returns (exit code, report). Bad input raises before anything is written."""
    from deepship.registry import open_registry
    from deepship.retrain_report import write_retrain_report

    check_options(options)
    reg = open_registry(options.registry)
    champion = resolve_champion(reg, options)
    base = challenger_config(champion.config, options.data, options.out, options.overrides)
    batch, new, decision = read_new_data(champion, options)
    with workdir_lock(options.out):
        cfg, decision_file, data = write_new_data(base, batch, new, decision, options)
        outcome = Outcome(champion, data)
        outcome.run_dir = train_challenger(cfg)
        outcome.package = export_challenger(outcome.run_dir, options.out / PACKAGE_DIR)
        outcome.lineage = lineage(champion, cfg, data, outcome.run_dir)
        outcome.decision = decision_dict(register_and_promote(reg, outcome, decision_file, options))
        code = EXIT_PROMOTED if outcome.decision["promoted"] else EXIT_REFUSED
        report = write_retrain_report(report_fields(outcome, code), options.out)
    return code, report
