"""PyTorch -> ONNX, and the parity check that decides whether the ONNX model may ship.

Parity compares two complete paths on real validation inputs: the training preprocessing into the
PyTorch module (eval mode) against the package's own torch-free preprocessing into onnxruntime.
Comparing only the networks on identical tensors would miss a preprocessing or tokenizer mismatch.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deepship.errors import ExportError
from deepship.models.backbones import classification_head
from deepship.run import LoadedRun
from deepship.runtime.modality import Modality, modality_for
from deepship.runtime.package import EMBEDDINGS_OUTPUT
from deepship.runtime.predictor import Predictor, batched

OUTPUT_NAME = "logits"
PARITY_BATCH = 32  # the validation inputs go through in batches of this size
PARITY_MAX_INPUTS = 256  # validation inputs the gate compares, at most


def run_modality(run: LoadedRun) -> Modality:
    """The run's modality as the package will describe it (its preprocessing spec)."""
    return modality_for(run.backbone.preprocessing.to_dict())


# --------------------------------------------------------------------------------- reference
def training_inputs(run: LoadedRun, raw: Sequence[str]) -> dict[str, torch.Tensor]:
    """Raw inputs through exactly what validation used during training (the data layer's collate)."""
    from deepship.data.datamodule import eval_batch

    return eval_batch(run.backbone, raw)


def torch_outputs(run: LoadedRun, raw: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch logits (N, C) and embeddings (N, D), float32, eval mode, in chunks of `batch_size`."""
    run.module.eval()
    captured: list[torch.Tensor] = []
    handle = classification_head(run.module.net).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    logits, embeddings = [], []
    try:
        with torch.inference_mode():
            for batch in batched(raw, batch_size):
                logits.append(run.module(**training_inputs(run, batch)).float().numpy())
                embeddings.append(captured[-1].flatten(1).float().numpy())
    finally:
        handle.remove()
    return np.concatenate(logits), np.concatenate(embeddings)


def torch_logits(run: LoadedRun, raw: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """PyTorch logits (N, C) float32 for raw inputs, eval mode, in chunks of `batch_size`."""
    return torch_outputs(run, raw, batch_size)[0]


# ------------------------------------------------------------------------------------ export
def export_onnx(run: LoadedRun, example_raw: Sequence[str], path: Path, opset: int = 17) -> None:
    """Write the net as ONNX: named inputs, `logits` out, dynamic batch (and, for text, sequence) axes."""
    example = training_inputs(run, example_raw)  # ordered as the net's forward signature
    axes = run_modality(run).dynamic_axes()
    dynamic = {name: axes for name in example} | {OUTPUT_NAME: {0: "batch"}, EMBEDDINGS_OUTPUT: {0: "batch"}}
    net = WithEmbeddings(run.module.net.eval(), list(example))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # The TorchScript exporter handles dynamic_axes for HF encoders reliably; its tracer warnings
            # about shape-dependent branches are real risks, and the parity gate is what checks them.
            warnings.simplefilter("ignore")
            torch.onnx.export(net, tuple(example.values()), str(path), input_names=list(example),
                              output_names=[OUTPUT_NAME, EMBEDDINGS_OUTPUT], dynamic_axes=dynamic, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    finally:
        net.detach()
    check_onnx(path)


class WithEmbeddings(torch.nn.Module):
    """net -> (logits (N, C), embeddings (N, D)): the embeddings are the input of the net's last Linear
    (the classification head), captured by a forward pre-hook, so no backbone needs a special path."""

    def __init__(self, net: torch.nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.net, self.input_names, self.captured = net, list(input_names), []
        self.handle = classification_head(net).register_forward_pre_hook(lambda module, args: self.captured.append(args[0]))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positional for the tracer, named for the net (whose signatures differ by modality)
        self.captured.clear()
        logits = self.net(**dict(zip(self.input_names, inputs)))
        return logits, self.captured[-1].flatten(1)

    def detach(self) -> None:
        self.handle.remove()  # the run's module goes back to plain logits


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError subclasses
        raise ExportError(f"{path}: onnx.checker (full check) failed: {exc}") from None


# ------------------------------------------------------------------------------------ parity
@dataclass(frozen=True)
class Tolerance:
    """np.allclose-style: an output passes where |onnx - torch| <= atol + rtol * |torch|."""

    atol: float = 1e-4
    rtol: float = 1e-4

    def allclose(self, got: np.ndarray, reference: np.ndarray) -> bool:
        return bool(np.allclose(got, reference, rtol=self.rtol, atol=self.atol))  # NaN is never close


@dataclass
class ParityCase:
    name: str
    raw: list[str]
    batch_size: int  # fed to both sides in batches of this size


@dataclass
class CaseResult:
    name: str
    batch_size: int
    num_inputs: int
    shape: list[int]  # the first model input's shape in the case's first batch, as the package fed it
    max_abs_diff: float  # logits
    embeddings_max_abs_diff: float | None  # None when the model exports no embeddings
    within_tolerance: bool  # both outputs, every element
    top1_agreement: float


@dataclass
class ParityReport:
    max_abs_diff: float  # logits, over every case
    embeddings_max_abs_diff: float | None
    within_tolerance: bool
    top1_agreement: float
    batch_sizes: list[int]
    num_compared: int  # inputs run through both sides, over every case
    cases: list[CaseResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cycle(items: Sequence[str], n: int) -> list[str]:
    # Small validation sets still fill a batch: repeat them in order.
    return [items[i % len(items)] for i in range(n)]


def parity_cases(val_inputs: Sequence[str], modality: Modality) -> list[ParityCase]:
    """Batches of 1 and 7, every validation input (up to PARITY_MAX_INPUTS) in batches of PARITY_BATCH,
    and the modality's own edge cases (text: very short and past-max-length inputs)."""
    validation = list(val_inputs[:PARITY_MAX_INPUTS]) if len(val_inputs) >= PARITY_BATCH else \
        cycle(val_inputs, PARITY_BATCH)
    cases = [ParityCase("batch_1", cycle(val_inputs, 1), 1), ParityCase("batch_7", cycle(val_inputs, 7), 7),
             ParityCase("validation", validation, PARITY_BATCH)]
    return cases + [ParityCase(name, raw, len(raw)) for name, raw in modality.parity_inputs(val_inputs)]


def onnx_outputs(predictor: Predictor, case: ParityCase) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """The package's logits and embeddings for the case, batch by batch, and its first batch's input shape."""
    logits, embeddings, shape = [], [], None
    for batch in batched(case.raw, case.batch_size):
        arrays = predictor.preprocess(batch)
        shape = shape or list(next(iter(arrays.values())).shape)
        batch_logits, batch_embeddings = predictor.outputs(arrays)
        logits.append(batch_logits)
        embeddings.append(batch_embeddings)
    return np.concatenate(logits), np.concatenate(embeddings) if predictor.has_embeddings else None, shape or []


def compare_case(run: LoadedRun, predictor: Predictor, case: ParityCase, tolerance: Tolerance) -> CaseResult:
    reference, reference_embeddings = torch_outputs(run, case.raw, case.batch_size)  # (N, C), (N, D)
    logits, embeddings, shape = onnx_outputs(predictor, case)
    within = tolerance.allclose(logits, reference)
    embeddings_diff = None
    if embeddings is not None:
        embeddings_diff = float(np.abs(reference_embeddings - embeddings).max())
        within = within and tolerance.allclose(embeddings, reference_embeddings)
    agree = float((reference.argmax(1) == logits.argmax(1)).mean())
    return CaseResult(case.name, case.batch_size, len(case.raw), shape, float(np.abs(reference - logits).max()),
                      embeddings_diff, within, agree)


def check_parity(run: LoadedRun, predictor: Predictor, cases: Sequence[ParityCase],
                 tolerance: Tolerance = Tolerance()) -> ParityReport:
    results = [compare_case(run, predictor, c, tolerance) for c in cases]
    total = sum(r.num_inputs for r in results)
    embeddings = [r.embeddings_max_abs_diff for r in results if r.embeddings_max_abs_diff is not None]
    return ParityReport(
        max_abs_diff=max(r.max_abs_diff for r in results),
        embeddings_max_abs_diff=max(embeddings) if embeddings else None,
        within_tolerance=all(r.within_tolerance for r in results),
        top1_agreement=sum(r.top1_agreement * r.num_inputs for r in results) / total,
        batch_sizes=sorted({min(r.batch_size, r.num_inputs) for r in results}),
        num_compared=total,
        cases=results,
    )


def enforce_fp32_gate(report: ParityReport, tolerance: Tolerance) -> None:
    if report.top1_agreement < 1.0 or not report.within_tolerance:
        worst = next((r for r in report.cases if not r.within_tolerance), None) or \
            min(report.cases, key=lambda r: r.top1_agreement)
        embeddings = "n/a" if report.embeddings_max_abs_diff is None else f"{report.embeddings_max_abs_diff:.3g}"
        raise ExportError(
            f"parity gate failed: logits max_abs_diff {report.max_abs_diff:.3g}, embeddings max_abs_diff {embeddings} "
            f"(tolerance atol {tolerance.atol:g} + rtol {tolerance.rtol:g} x |torch|), top-1 agreement "
            f"{report.top1_agreement:.2%} (needs 100%); first failing case '{worst.name}' shape {worst.shape}; "
            "the ONNX model does not reproduce PyTorch, no package written"
        )
