"""NaN/Inf losses and gradients, caught without a host sync per training step.

Reading a loss on the host (`bool(torch.isfinite(loss))`, `.item()`) makes the CPU wait for the GPU every step, so
the next step's kernels cannot be queued while this one runs. Instead each optimizer step computes a flag on the
device (the loss is non-finite, or any gradient is, after DDP's all-reduce, so every rank agrees) and hands it to
fused AdamW as `found_inf`: the update is skipped on the device, the way GradScaler skips overflowed fp16 steps.
The host reads the counters only at `check()` (log steps, checkpoint saves, epoch ends), where Lightning syncs anyway.

- stop: after the first bad step every update is skipped, so nothing changes after it; the next check raises
  TrainingError naming that step, before any checkpoint is written.
- skip: only bad steps are skipped; each check warns with how many were, and where the first one was.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from deepship.errors import TrainingError

Where = tuple[int, int, int]  # (global step, epoch, batch index) of an optimizer step


def grads_nonfinite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim bool: any NaN/Inf in `grads`; one foreach pass (the unscale by 1.0 leaves the values as they are)."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=device))
    return found > 0


class NonfiniteGuard:
    def __init__(self, mode: str) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"nonfinite mode must be stop or skip, not {mode!r}")
        self.mode = mode
        self.skipped = 0  # bad steps reported so far (skip mode)
        self.pending: list[Where] = []  # host-side positions of the steps since the last check
        self._t: dict[str, torch.Tensor] | None = None  # device counters, created with the first loss

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._t is None or self._t["step"].device != device:
            zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
            self._t = {"loss_bad": zeros(torch.bool), "loss": zeros(torch.float32), "any": zeros(torch.bool),
                       "since": zeros(torch.int64), "first": zeros(torch.int64), "first_loss": zeros(torch.float32),
                       "step": zeros(torch.int64)}
        return self._t

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Each training micro-batch's loss (several per step with gradient accumulation)."""
        t = self._tensors(loss.device)
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        t["loss"] = torch.where(t["loss_bad"], t["loss"], loss)  # this step's first bad value, else its latest
        t["loss_bad"] = t["loss_bad"] | bad

    def gate(self, optimizer: torch.optim.Optimizer, where: Where) -> None:
        """Before the optimizer step: flag this step and tell fused AdamW whether to skip it."""
        if self._t is None:
            return
        t = self._t
        device = t["step"].device
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        bad = t["loss_bad"] | grads_nonfinite(grads, device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # FSDP's gradient shards differ by rank: agree on the device (a collective, not a host sync)
            flag = bad.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag > 0
        first = bad & (t["since"] == 0)
        t["first"] = torch.where(first, t["step"], t["first"])
        t["first_loss"] = torch.where(first, t["loss"], t["first_loss"])
        t["since"] += bad
        t["any"] = t["any"] | bad
        t["step"] += 1
        skip = t["any"] if self.mode == "stop" else bad
        optimizer.found_inf = skip.float()  # read by fused AdamW's step (torch.optim.Adam passes it through)
        t["loss_bad"] = torch.zeros_like(t["loss_bad"])
        self.pending.append(where)

    def check(self) -> None:
        """Host sync: raise (stop) or warn (skip) about bad steps since the last check. No collective here: the
        per-step flags were all-reduced on the device, so every rank holds the same counts and raises together.
        (A collective here would also interleave with the epoch-end metric syncs that rank 0's progress bar and
        history start before the other ranks do.)"""
        if self._t is None or not self.pending:
            return
        t = self._t
        since = int(t["since"])
        if since == 0:
            self.pending.clear()
            return
        index = int(t["first"]) - (int(t["step"]) - len(self.pending))
        step, epoch, batch = self.pending[index] if 0 <= index < len(self.pending) else self.pending[0]
        loss = float(t["first_loss"])
        what = f"non-finite loss ({loss})" if not torch.isfinite(torch.tensor(loss)) else \
            f"non-finite gradients (loss {loss})"
        where = f"global step {step} (epoch {epoch}, batch {batch})"
        self.pending.clear()
        if self.mode == "stop":
            raise TrainingError(f"train: {what} at {where}; nothing was updated or saved after it; lower "
                                "train.lr, check the data, or set train.nonfinite=skip")
        self.skipped += since
        t["since"].zero_()
        rank_zero_warn(f"train: {what} at {where}" + (f" and {since - 1} later batch(es)" if since > 1 else "")
                       + "; skipped (train.nonfinite=skip)")

    def unreported(self) -> int:
        """Bad steps not yet seen by check() (a host sync; for reading the count after training)."""
        return int(self._t["since"]) if self._t is not None else 0
