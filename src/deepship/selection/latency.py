"""The latency budget, checked before any training: every architecture the space can produce (backbone x
input size) is built untrained, exported through the package's own ONNX path and timed at batch 1 with
onnxruntime on this host. latency.json records it; trials whose architecture is over budget never train."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepship.config import Config
from deepship.errors import ConfigError
from deepship.files import write_json
from deepship.selection.config import ParamSpec, SweepConfig
from deepship.selection.space import apply_params

LATENCY_FILE = "latency.json"
LATENCY_RUNS = 50  # timed batch-1 calls per architecture, after warm-up; p95 of 50 is the 3rd slowest


@dataclass(frozen=True)
class Architecture:
    backbone: str
    size: int | None  # image: model.image_size (None = the backbone's default); text: data.max_length

    def describe(self, size_key: str) -> str:
        return f"{self.backbone} @ {size_key}={self.size if self.size is not None else 'default'}"


def size_key(cfg: Config) -> str:
    """The config key that sets the input size the network runs at."""
    return "model.image_size" if cfg.modality == "image" else "data.max_length"


def trial_architecture(cfg: Config) -> Architecture:
    return Architecture(cfg.model.backbone, cfg.model.image_size if cfg.modality == "image" else cfg.data.max_length)


def spec_values(spec: ParamSpec) -> list[Any]:
    """Sizes to measure for one space entry: the choices, or the two bounds of a range (between them
    latency grows with size, so a trial is judged by the nearest measured size at or above its own)."""
    if spec.type == "categorical":
        return list(spec.choices or [])
    return [int(spec.low), int(spec.high)]


def listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def candidate_architectures(sweep_cfg: SweepConfig) -> list[Architecture]:
    """Every distinct (backbone, size) a trial can get, honouring a size entry's `when: {model.backbone: ...}`."""
    space, base = sweep_cfg.sweep.space, sweep_cfg.config
    key = size_key(base)
    base_size = trial_architecture(base).size
    backbone_spec = space.get("model.backbone")
    backbones = spec_values(backbone_spec) if backbone_spec is not None else [base.model.backbone]
    size_spec = space.get(key)
    found: list[Architecture] = []
    for backbone in backbones:
        sizes: list[Any] = [base_size]
        if size_spec is not None:
            when = size_spec.when or {}
            applies = "model.backbone" not in when or backbone in listed(when["model.backbone"])
            may_be_off = not applies or bool(set(when) - {"model.backbone"})
            sizes = (spec_values(size_spec) if applies else []) + ([base_size] if may_be_off else [])
        for size in sizes:
            arch = Architecture(str(backbone), size)
            if arch not in found:
                found.append(arch)
    return found


def example_input(cfg: Config, arch: Architecture, folder: Path) -> str:
    """One raw input at the architecture's full size: an image file, or a text past max_length tokens."""
    if cfg.modality == "text":
        return " ".join(["word"] * 2 * (arch.size or 128))
    import numpy as np
    from PIL import Image

    side = arch.size or 224
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    path = folder / "example.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def measure_architecture(sweep_cfg: SweepConfig, arch: Architecture, classes: list[str]) -> dict[str, Any]:
    """Build the untrained model, export it with export_onnx, time batch-1 onnxruntime calls (model only)."""
    from deepship.data.datamodule import eval_batch
    from deepship.evaluation.latency import percentiles_ms, time_calls
    from deepship.export.onnx import export_onnx
    from deepship.models.backbones import build_backbone
    from deepship.run import LoadedRun, build_module, loss_settings
    from deepship.runtime.package import build_session

    key = size_key(sweep_cfg.config)
    # random weights: the architecture, not the weights, sets the latency, and nothing is downloaded
    raw = apply_params(sweep_cfg.base, {"model.backbone": arch.backbone, key: arch.size, "model.pretrained": False})
    cfg = Config.model_validate(raw, context={"skip_path_checks": True})
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, len(classes))
    module = build_module(cfg, backbone, classes, loss_settings(cfg, classes, []))
    with tempfile.TemporaryDirectory(prefix="deepship-latency-") as tmp:
        folder = Path(tmp)
        example = example_input(cfg, arch, folder)
        onnx_path = folder / "model.onnx"
        export_onnx(LoadedRun(folder, cfg, classes, backbone, module), [example], onnx_path)
        arrays = {name: tensor.numpy() for name, tensor in eval_batch(backbone, [example]).items()}
        session = build_session(onnx_path)
        feed = {i.name: arrays[i.name] for i in session.get_inputs()}
        times = time_calls(lambda: session.run(None, feed), LATENCY_RUNS)
        onnx_bytes = onnx_path.stat().st_size
    return {"backbone": arch.backbone, "size_key": key, "size": arch.size, **percentiles_ms(times),
            "param_count": sum(p.numel() for p in module.parameters()), "onnx_bytes": onnx_bytes}


def measure_named(sweep_cfg: SweepConfig, arch: Architecture, classes: list[str]) -> dict[str, Any]:
    """measure_architecture, with a candidate that cannot be built (an unknown backbone among the choices)
    named as the sweep's problem: every trial that draws it would fail."""
    try:
        return measure_architecture(sweep_cfg, arch, classes)
    except ConfigError as exc:
        raise ConfigError(f"sweep.space: candidate {arch.describe(size_key(sweep_cfg.config))}: {exc}") from None


def measure_candidates(sweep_cfg: SweepConfig, classes: list[str]) -> dict[str, Any]:
    """latency.json's content; an existing file for the same candidates and classes is reused, so a resumed
    sweep or a second worker judges trials by the same numbers."""
    path = sweep_cfg.sweep_dir / LATENCY_FILE
    archs = candidate_architectures(sweep_cfg)
    wanted = [[a.backbone, a.size] for a in archs]
    if path.is_file():
        old = json.loads(path.read_text())
        if [[c["backbone"], c["size"]] for c in old.get("candidates", [])] == wanted and old.get("classes") == len(classes):
            return old
    report = {"host": f"{platform.machine()} {os.cpu_count()} cores", "batch_size": 1, "runs": LATENCY_RUNS,
              "includes": "onnxruntime session.run of the untrained model (no preprocessing)", "classes": len(classes),
              "candidates": [measure_named(sweep_cfg, a, classes) for a in archs]}
    sweep_cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    return report


def check_budget(report: dict[str, Any], budget_ms: float | None) -> None:
    """No architecture within the budget: nothing could ever train, so stop before the first trial."""
    if budget_ms is None:
        return
    fastest = min(report["candidates"], key=lambda c: c["p95"])
    if fastest["p95"] > budget_ms:
        arch = Architecture(fastest["backbone"], fastest["size"]).describe(fastest["size_key"])
        raise ConfigError(f"sweep.objective.latency_budget_ms: {budget_ms:g} ms: no candidate meets it; the fastest, "
                          f"{arch}, has p95 {fastest['p95']:.2f} ms on this host; raise the budget or add smaller "
                          "backbones or input sizes")


def lookup_latency(report: dict[str, Any], arch: Architecture) -> dict[str, Any] | None:
    """The measured entry for a trial's architecture: the same size, else the nearest measured size above it
    (a conservative bound), else the largest measured."""
    same = [c for c in report["candidates"] if c["backbone"] == arch.backbone]
    exact = [c for c in same if c["size"] == arch.size]
    if exact or not same:
        return exact[0] if exact else None
    sized = sorted((c for c in same if c["size"] is not None), key=lambda c: c["size"])
    above = [c for c in sized if arch.size is not None and c["size"] >= arch.size]
    return above[0] if above else (sized[-1] if sized else same[0])
