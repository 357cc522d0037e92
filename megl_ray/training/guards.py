"""Stopping a run that diverged: a loss that is not finite for ``train.max_nonfinite_steps`` optimizer steps in a
row ends training with one clear line instead of training on NaN weights, exporting them and reporting success.

A single non-finite step can be transient (one odd batch); K in a row means the weights themselves are gone.
Under Ray Train every rank must stop at the same step (a rank that leaves early would hang the others in the next
collective), so the verdict is all-reduced: the run stops when any rank saw K non-finite losses in a row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megl_ray.errors import UserError

DIVERGED_KEY = "diverged"
"""Metric that a stopped Ray Train run reports, holding the message; the driver raises it as a ``UserError``."""


class TrainingDiverged(UserError):
    """The loss was not finite for too many steps in a row."""


class DivergenceGuard:
    """Counts consecutive optimizer steps whose loss is not finite; ``patience`` 0 disables the guard."""

    def __init__(self, patience: int, distributed: bool = False):
        self.patience, self.distributed = patience, distributed
        self.bad_steps = 0
        self.message: str | None = None

    def update(self, loss: Any, step: int) -> bool:
        """Record the loss of optimizer step ``step``; True when training must stop (``self.message`` says why)."""
        if not self.patience:
            return False
        if not hasattr(loss, "detach"):
            loss = torch.tensor(float(loss))
        # One host read per optimizer step, and only of a flag: this rank's finiteness and (distributed) whether
        # any rank must stop travel together, on the loss's device (NCCL has no CPU tensors).
        finite = torch.isfinite(loss.detach().float()).all().reshape(1)
        # this rank stops when this step is bad and it had patience − 1 bad ones before it
        stop_here = (~finite).float() * float(self.bad_steps + 1 >= self.patience)
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(stop_here, op=dist.ReduceOp.MAX)
        verdict = int((2 * stop_here + (~finite).float()).item())  # bit 1: stop (any rank), bit 0: this step bad
        self.bad_steps = self.bad_steps + 1 if verdict & 1 else 0
        stop = bool(verdict & 2)
        if stop and self.message is None:
            value = float(loss.detach().float().sum())  # once, for the message
            self.message = (
                f"training diverged: the loss was not finite (last {value}) for "
                f"{max(self.bad_steps, 1)} step(s) in a row up to step {step}; lower optim.lr, raise "
                f"optim.warmup_steps or check the loss weights (train.max_nonfinite_steps="
                f"{self.patience})"
            )
        return stop

    def check(self, loss: Any, step: int) -> None:
        """``update``, raising ``TrainingDiverged`` when training must stop (single-process training)."""
        if self.update(loss, step):
            raise TrainingDiverged(self.message)


def raise_if_diverged(metrics: dict[str, Any]) -> None:
    """Driver side: a run whose workers stopped on divergence ends as one ``UserError``."""
    if metrics.get(DIVERGED_KEY):
        raise TrainingDiverged(str(metrics[DIVERGED_KEY]))
