"""What differs per rank and what a 7B LoRA checkpoint must not carry: per-rank reseeding, the RNG state files
(CUDA's included on GPUs), and the checkpoint options that leave frozen parameters out.

Frozen parameters (a frozen CLIP tower, a LoRA run's base LM) never change: they are rebuilt from the base
checkpoints the config names (or from the seed, for the random-init tiny preset), so DeepSpeed checkpoints exclude
them (``exclude_frozen_parameters``) and load non-strictly. A 7B LoRA run then stages megabytes per checkpoint,
not 14 GB.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAVE_OPTIONS = {"exclude_frozen_parameters": True}
LOAD_OPTIONS = {"load_module_strict": False}  # the frozen parameters are absent on purpose


def exclude_tied_frozen(engine: Any) -> None:
    """DeepSpeed's ``exclude_frozen_parameters`` walks ``named_parameters()``, which names a tied parameter once:
    the other name of a frozen tied embedding (Qwen2's ``lm_head.weight``) stayed in every checkpoint. This engine's
    module state dict drops every name of every frozen parameter."""
    if getattr(engine, "_megl_excludes_tied", False):
        return
    original = type(engine).module_state_dict

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        sd = original(
            engine,
            destination=destination,
            prefix=prefix,
            keep_vars=keep_vars,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    engine.module_state_dict = module_state_dict
    engine._megl_excludes_tied = True


def rank_seed(seed: int, rank: int) -> int:
    """A seed derived from (seed, rank): after identical initialisation every rank reseeds with it, so dropout and
    LoRA-dropout masks differ across ranks instead of repeating the same mask on every shard of the batch."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def reseed_rank(seed: int, rank: int) -> None:
    torch.manual_seed(rank_seed(seed, rank))


def save_rng(path: Path) -> None:
    state = {
        "torch": torch.get_rng_state(),
        "numpy_state": torch.tensor(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(int(np.random.get_state()[2])),
        "python": torch.tensor(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this worker's device
    torch.save(state, path)


def load_rng(path: Path) -> None:
    if not path.exists():
        return
    rng: dict[str, Any] = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy_state"].numpy().astype(np.uint32), int(rng["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in rng["python"].tolist()), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
