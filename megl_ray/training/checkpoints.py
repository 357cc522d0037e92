"""A training run's checkpoint, as every rank writes and reads it: the DeepSpeed shards of every rank (frozen
parameters excluded), ``train_state.json`` (epoch, optimizer step, the ids already trained in the current epoch,
the resolved config) and one RNG file per rank. DeepSpeed's files are read back with ``weights_only`` loading.

Imports DeepSpeed: only worker processes import this module, once their environment is set (``entry``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from megl_ray.training.as_export import STATE_FILE
from megl_ray.training.rank_state import LOAD_OPTIONS, SAVE_OPTIONS, exclude_tied_frozen, load_rng, save_rng

SAFE_GLOBALS = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, set, argparse.Namespace]
"""What DeepSpeed's checkpoint files hold besides tensors and builtins: ``weights_only`` loading allows these."""
DS_TAG = "megl"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    epoch: int = 0
    """The epoch in progress (or the next one, when ``epoch_ids`` is empty)."""
    step: int = 0
    """Optimizer steps taken so far."""
    epoch_ids: list[str] = field(default_factory=list)
    """Ids of the samples of ``epoch`` whose gradients are in the checkpoint's weights."""
    epoch_micro: int = 0
    """Micro-batches per worker of ``epoch`` consumed (all applied: checkpoints are taken at step boundaries)."""
    micro_steps: int = 0
    """DeepSpeed's micro-step counter (its accumulation position), which its checkpoint does not restore."""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    """The dataset's class names (with ``tokenizer/``, what ``export --from-checkpoint`` needs beyond the weights)."""


def _weights_only_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed load its checkpoint files with ``torch.load(weights_only=True)``: a checkpoint read back
    from shared storage must not be able to run code. Its files hold tensors, numbers, strings and a few
    DeepSpeed enums, which are allow-listed."""

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if isinstance(current, TorchCheckpointEngine):
        replacement = WeightsOnly.__new__(WeightsOnly)
        replacement.__dict__.update(current.__dict__)
        engine.checkpoint_engine = replacement
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "checkpoint_engine"):
            optimizer.checkpoint_engine = replacement


def save_checkpoint(engine: Any, state: TrainState, directory: Path, rank: int) -> None:
    """Every rank writes its DeepSpeed shard (a collective call; frozen parameters excluded), its RNG state, and
    rank 0 the train state."""
    exclude_tied_frozen(engine)
    engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=True, **SAVE_OPTIONS)
    save_rng(directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), default=str))
        engine.module.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))  # kB to MB: a checkpoint exports alone


def load_checkpoint(engine: Any, directory: Path, rank: int) -> TrainState:
    _weights_only_checkpoint_engine(engine)
    path, _ = engine.load_checkpoint(
        str(directory), tag=DS_TAG, load_lr_scheduler_states=True, load_optimizer_states=True, **LOAD_OPTIONS
    )
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")
    raw = json.loads((directory / STATE_FILE).read_text())
    state = TrainState(**raw)
    load_rng(directory / f"rng_rank{rank}.pt")
    return state
