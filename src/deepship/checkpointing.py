"""Checkpoint IO: atomic, finite-only writes, weights-only reads, and the RNG states a checkpoint carries."""

from __future__ import annotations

import random
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deepship.errors import TrainingError
from deepship.files import atomic_write
from deepship.run import load_checkpoint_file


def nonfinite_weights(checkpoint: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors with NaN/Inf in the weights a checkpoint would carry."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key in ("state_dict", "current_model_state"):  # the latter: raw weights when EMA swapped its average in
        for name, value in (checkpoint.get(key) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                by_device.setdefault(value.device, []).append((name, value))
    bad = []
    for items in by_device.values():  # one host read per device, not one per tensor
        finite = torch.stack([torch.isfinite(value).all() for _, value in items]).tolist()
        bad += [name for (name, _), ok in zip(items, finite) if not ok]
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint appears whole or not at all (temp file, fsync, os.replace), is refused when its weights
    are not finite, and loads weights-only, so a crafted file cannot run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        bad = nonfinite_weights(checkpoint)
        if bad:
            raise TrainingError(f"{path}: not written: non-finite weights in {bad[:3]}; the previous checkpoint "
                                "is kept; lower train.lr or check the data")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self._writer(checkpoint))

    def _writer(self, checkpoint: dict[str, Any]) -> Callable[[IO[bytes]], None]:
        return lambda f: torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location="cpu")


def collect_rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
