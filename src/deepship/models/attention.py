"""The scaled-dot-product-attention backend for a text model, chosen by measurement.

PyTorch picks an SDPA kernel per call by rules (inputs, dtype, mask), not by speed, and which kernel is fastest
depends on the card, the precision, the head size and the sequence length. So `train.sdpa_backend: auto` times a
few forward+backward steps of the real model on a real batch with each backend that can run it, and trains with
the fastest. The choice is stored in the checkpoint, so a resumed run keeps the same kernels (and numerics).
"""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DEVICE_BACKENDS = {"cuda": ("flash", "efficient", "cudnn", "math"), "cpu": ("flash", "math")}


def backend_context(name: str | None) -> AbstractContextManager[Any]:
    """The chosen backend first, math as the fallback for a shape or mask the chosen one cannot take (a longer
    bucket than the measured batch, an evaluation batch), so that never stops a run."""
    if not name:
        return nullcontext()
    return sdpa_kernel([BACKENDS[name]] + ([SDPBackend.MATH] if name != "math" else []), set_priority=True)


def measuring_context(name: str) -> AbstractContextManager[Any]:
    return sdpa_kernel([BACKENDS[name]])  # no fallback: a backend that cannot run must say so


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(net: nn.Module, inputs: dict[str, torch.Tensor], name: str, repeats: int = 3, warmup: int = 2,
            autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> float | None:
    """Median ms of one forward+backward with backend `name`; None where that backend cannot run these inputs.
    Gradients go to torch.autograd.grad, not to .grad: the measurement leaves no trace in the parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    device = next(net.parameters()).device
    times = []
    try:
        with warnings.catch_warnings(), measuring_context(name):
            warnings.simplefilter("ignore")  # "Flash attention does not support ..." for each refused backend
            for i in range(warmup + repeats):
                sync(device)
                start = time.perf_counter()
                with autocast():
                    # .forward: eager even when train.compile compiled the module (no compile per backend)
                    loss = net.forward(**inputs).float().logsumexp(1).mean()
                torch.autograd.grad(loss, params, allow_unused=True)
                sync(device)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
    except RuntimeError:  # "No available kernel": this backend does not take these shapes, dtype or mask
        return None
    return round(sorted(times)[len(times) // 2], 3)


def measure_backends(net: nn.Module, inputs: dict[str, torch.Tensor], names: tuple[str, ...], repeats: int = 3,
            autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> dict[str, float | None]:
    """ms per step for each backend in `names`; the global RNG state (dropout draws) is left as it was."""
    device = next(net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return {name: step_ms(net, inputs, name, repeats, autocast=autocast) for name in names}


def fastest(timings: dict[str, float | None]) -> str | None:
    usable = {name: ms for name, ms in timings.items() if ms is not None}
    return min(usable, key=usable.__getitem__) if usable else None


def describe_backends(chosen: str, timings: dict[str, float | None]) -> str:
    others = ", ".join(f"{n} {ms:.1f} ms" if ms is not None else f"{n} cannot run these inputs"
                       for n, ms in timings.items() if n != chosen)
    return f"attention: SDPA backend {chosen} ({timings[chosen]:.1f} ms per step{'; ' + others if others else ''})"
