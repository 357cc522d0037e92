"""The contract between the driver and its Ray Train workers: one frozen, typed plan built on the head node and
pickled once (Ray Train hands it to every worker as ``train_loop_config["plan"]``).

Everything a worker needs that it cannot compute itself is here; nothing else is. A field added on one side and
forgotten on the other fails at construction, not as a missing dict key deep inside a worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megl_ray.config import MEGLConfig, config_from_dict

PLAN_KEY = "plan"
"""The one key of Ray Train's ``train_loop_config`` (a dict by Ray's contract)."""


@dataclass(frozen=True)
class WorkerPlan:
    config: dict[str, Any]
    """The resolved ``MEGLConfig`` as a plain dict (data and storage filled in): the config checkpoints hold."""
    env: dict[str, str]
    """Environment variables every worker sets before importing DeepSpeed (S3 endpoint, DS_ACCELERATOR, kernel
    cache); never credentials (see ``megl_ray.cluster.credentials``)."""
    tokenizer: Any
    """The tokenizer the driver loaded (the tiny preset's is trained on the training rationales)."""
    num_classes: int
    classes: tuple[str, ...]
    prior: tuple[tuple[float, ...], ...]
    """The dataset's mean normalised ground-truth map Ā (the L_dc target)."""
    train_ids: tuple[str, ...]
    """The ids that train, in the dataset's order; each worker takes its seeded share per epoch."""
    use_gpu: bool
    run_uri: str
    """Where the run's checkpoints and export go."""
    has_val: bool
    """Whether the trainer was given a ``val`` dataset to validate on at each epoch's end."""
    has_test: bool = False
    """Whether the trainer was given a ``test`` dataset, evaluated once after the export (a sweep's trials skip it)."""
    train_cache: Any = None
    """The training split materialised in Ray's object store (``train.cache_data``), or None: read per epoch."""
    verbose: bool = False
    board: Any = None
    """The driver's progress board (a Ray actor handle) rank 0 reports to, or None."""
    credentials_file: str | None = None
    """A 0600 file holding the S3 credentials for workers that did not inherit them, removed after training."""
    gallery: Any = None
    """The examples of the end-of-run explanation gallery (``training.gallery.GallerySource``), or None: none."""

    @property
    def train_rows(self) -> int:
        return len(self.train_ids)

    def megl_config(self) -> MEGLConfig:
        return config_from_dict(self.config)

    def as_loop_config(self) -> dict[str, WorkerPlan]:
        return {PLAN_KEY: self}


def plan_of(loop_config: dict[str, Any]) -> WorkerPlan:
    return loop_config[PLAN_KEY]
