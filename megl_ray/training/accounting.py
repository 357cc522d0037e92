"""What each worker trains in an epoch, and which samples count as trained.

An epoch's order is a permutation of the training ids seeded by (seed, epoch) and dealt out to the workers; each
worker's share streams in a file/block order also seeded by (seed, epoch) and through a local shuffle seeded by
(seed, epoch, rank). All of it is a pure function of (seed, epoch, rank, world), so a resumed epoch replays exactly
the batches the original run would have seen and skips the ones already applied.

With gradient accumulation a micro-batch's gradient is applied only by the optimizer step at the end of its
accumulation window. ``Accounting`` keeps those "pending" ids apart: a checkpoint (taken only at a window's end)
records exactly the samples whose gradients are in the saved weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Micro-batches per worker and epoch: each worker's share is padded to ``ceil(rows / world)`` rows."""
    return math.ceil(math.ceil(rows / world) / batch_size)


def planned_steps(rows: int, world: int, batch_size: int, epochs: int, grad_accum: int) -> int:
    """Optimizer steps of the whole run (an accumulation window may span an epoch's end)."""
    return steps_per_epoch(rows, world, batch_size) * epochs // grad_accum


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer seed per (seed, epoch) for Ray Data's file and block shuffles."""
    return int(np.random.default_rng([seed, epoch, 11]).integers(0, 2**31 - 1))


def epoch_share(train_ids: Sequence[str], seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """This worker's ids of ``epoch``: the epoch's seeded permutation dealt round-robin (shares differ by at most
    one row; the pipeline pads them to ``ceil(len / world)``)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(len(train_ids))
    return [train_ids[i] for i in order[rank::world]]


@dataclass
class Accounting:
    """Micro-batches of the epoch in progress: consumed, pending (gradient not applied yet) and applied."""

    applied: list[str] = field(default_factory=list)
    """This worker's ids of the epoch whose gradients an optimizer step has applied."""
    pending: list[str] = field(default_factory=list)
    """Ids of the current accumulation window (this epoch's part of it; a window may span an epoch's end)."""
    micro: int = 0
    """Micro-batches of this epoch consumed."""

    def consumed(self, ids: Sequence[str]) -> None:
        self.micro += 1
        self.pending.extend(ids)

    def applied_step(self) -> None:
        """The optimizer step at the end of the window ran: its micro-batches are trained."""
        self.applied.extend(self.pending)
        self.pending = []


# ------------------------------------------------------------------------------------------------ test hooks


@dataclass
class FaultHook:
    """Test-only fault injection: ``MEGL_TEST_KILL_AT_STEP=7,9@validation`` kills the last rank once at optimizer
    step 7 and once in the validation that follows step 9; ``MEGL_TEST_KILL_MARKER`` (plus ``.1``, ``.2`` … for the
    later kills) records that a kill happened, so the resumed run is not killed again."""

    kills: list[tuple[int, str, Path]] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> FaultHook:
        spec, marker = os.environ.get("MEGL_TEST_KILL_AT_STEP", ""), os.environ.get("MEGL_TEST_KILL_MARKER", "")
        kills = []
        if spec and marker:
            for i, item in enumerate(spec.split(",")):
                step, _, phase = item.partition("@")
                kills.append((int(step), phase or "step", Path(marker if i == 0 else f"{marker}.{i}")))
        return cls(kills)

    def maybe_kill(self, step: int, phase: str, rank: int, world: int, log) -> None:
        if rank != world - 1:
            return
        for at, where, marker in self.kills:
            if at == step and where == phase and not marker.exists():
                marker.write_text("killed")
                log.warning("test hook: killing rank %d at step %d (%s)", rank, step, phase)
                # Let the controller register the last reported checkpoint, as a real crash would; a node-loss test
                # holds the worker here longer (MEGL_TEST_KILL_HOLD_S) while it kills the worker's whole node.
                time.sleep(float(os.environ.get("MEGL_TEST_KILL_HOLD_S", "5")))
                os._exit(1)


@dataclass
class LrScaleHook:
    """Test-only: ``MEGL_TEST_LR_SCALE_AT_STEP=4:-10`` multiplies every parameter group's learning rate (the
    scheduler's base rates, so the schedule keeps its shape) by -10 once optimizer step 4 is taken — gradient ascent
    from there on, which forces a run's best checkpoint (lowest loss) before its end (the best-checkpoint test)."""

    step: int = 0
    factor: float = 1.0

    @classmethod
    def from_env(cls) -> LrScaleHook:
        spec = os.environ.get("MEGL_TEST_LR_SCALE_AT_STEP", "")
        if not spec:
            return cls()
        step, _, factor = spec.partition(":")
        return cls(int(step), float(factor))

    def maybe_scale(self, step: int, scheduler: Any, log) -> None:
        if self.step and step == self.step:
            scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= self.factor
            log.info("test hook: learning rates scaled by %g from step %d", self.factor, step)
