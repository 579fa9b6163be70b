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
from deepship.run import LoadedRun
from deepship.runtime.predictor import EMBEDDINGS_OUTPUT, Predictor

BATCH_SIZES = (1, 7, 32)
OUTPUT_NAME = "logits"


# --------------------------------------------------------------------------------- reference
def training_inputs(run: LoadedRun, raw: Sequence[str]) -> dict[str, torch.Tensor]:
    """Raw inputs through exactly what validation used during training (the data layer's collate)."""
    if run.backbone.modality == "image":
        from deepship.data.image import collate_images, eval_transform
        from deepship.runtime.preprocess import load_image

        transform = eval_transform(run.backbone.preprocessing)
        return collate_images([(transform(load_image(p)), 0) for p in raw])[0]
    from deepship.data.datamodule import text_preprocessor
    from deepship.data.text import TextCollator

    preprocessor = text_preprocessor(run.backbone)
    return TextCollator(preprocessor)([(e, 0) for e in preprocessor.tokenize(raw)])[0]


def torch_logits(run: LoadedRun, raw: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """PyTorch logits (N, C) float32 for raw inputs, eval mode, in chunks of `batch_size`."""
    run.module.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(raw), batch_size):
            chunks.append(run.module(**training_inputs(run, raw[start : start + batch_size])).float().numpy())
    return np.concatenate(chunks)


# ------------------------------------------------------------------------------------ export
def export_onnx(run: LoadedRun, example_raw: Sequence[str], path: Path, opset: int = 17) -> None:
    """Write the net as ONNX: named inputs, `logits` out, dynamic batch (and, for text, sequence) axes."""
    example = training_inputs(run, example_raw)  # ordered as the net's forward signature
    axes = {0: "batch", 1: "sequence"} if run.backbone.modality == "text" else {0: "batch"}
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
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        self.handle = head.register_forward_pre_hook(lambda module, args: self.captured.append(args[0]))

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
@dataclass
class ParityCase:
    name: str
    raw: list[str]


@dataclass
class CaseResult:
    name: str
    batch_size: int
    shape: list[int]  # the first model input's shape as the package fed it
    max_abs_diff: float
    top1_agreement: float


@dataclass
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    batch_sizes: list[int]
    num_compared: int
    cases: list[CaseResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cycle(items: Sequence[str], n: int) -> list[str]:
    # Small validation sets still fill batch 32: repeat them in order.
    return [items[i % len(items)] for i in range(n)]


def parity_cases(val_inputs: Sequence[str], modality: str, max_length: int | None = None) -> list[ParityCase]:
    """Batches of real validation inputs at 1, 7, 32; for text also very short and max-length inputs."""
    cases = [ParityCase(f"batch_{n}", cycle(val_inputs, n)) for n in BATCH_SIZES]
    if modality == "text" and max_length:
        short = [str(t).split()[0] if str(t).split() else "a" for t in cycle(val_inputs, 7)]
        # Repeating a real sentence past max_length forces truncation; one short text in the batch
        # means padding and a real attention mask at the longest shape.
        long = [" ".join([str(t)] * max_length) for t in cycle(val_inputs, 6)] + [short[0]]
        cases += [ParityCase("short_texts", short), ParityCase("max_length", long)]
    return cases


def compare_case(run: LoadedRun, predictor: Predictor, case: ParityCase) -> CaseResult:
    reference = torch_logits(run, case.raw, batch_size=len(case.raw))  # (N, C), one batch as given
    arrays = predictor.preprocess(case.raw)
    logits = predictor.run(arrays)  # (N, C)
    diff = float(np.abs(reference - logits).max())
    agree = float((reference.argmax(1) == logits.argmax(1)).mean())
    return CaseResult(case.name, len(case.raw), list(next(iter(arrays.values())).shape), diff, agree)


def check_parity(run: LoadedRun, predictor: Predictor, cases: Sequence[ParityCase]) -> ParityReport:
    results = [compare_case(run, predictor, c) for c in cases]
    total = sum(r.batch_size for r in results)
    return ParityReport(
        max_abs_diff=max(r.max_abs_diff for r in results),
        top1_agreement=sum(r.top1_agreement * r.batch_size for r in results) / total,
        batch_sizes=sorted({r.batch_size for r in results}),
        num_compared=total,
        cases=results,
    )


def enforce_fp32_gate(report: ParityReport, tolerance: float) -> None:
    if report.top1_agreement < 1.0 or not report.max_abs_diff <= tolerance:  # `not <=` also catches NaN
        worst = max(report.cases, key=lambda r: r.max_abs_diff)
        raise ExportError(
            f"parity gate failed: max_abs_diff {report.max_abs_diff:.3g} (tolerance {tolerance:g}), "
            f"top-1 agreement {report.top1_agreement:.2%} (needs 100%); worst case '{worst.name}' "
            f"shape {worst.shape}; the ONNX model does not reproduce PyTorch, no package written"
        )
