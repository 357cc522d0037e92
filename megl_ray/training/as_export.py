"""What ``evaluate`` and ``explain`` accept for ``--checkpoint``: an export, or a training checkpoint (what
``result.json``'s ``checkpoint`` and ``best_checkpoint`` name), exported on the fly into a temporary directory with
``export --from-checkpoint``'s code and removed afterwards."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator

from megl_ray import storage
from megl_ray.storage.embedded_home import embedded_store_for

log = logging.getLogger("megl_ray.export")

STATE_FILE = "train_state.json"
"""What marks a training checkpoint (``checkpoints`` writes it). Named here, not there: ``checkpoints`` imports
DeepSpeed, and this module stays light for the commands that import it at their top."""


def is_training_checkpoint(uri: str) -> bool:
    return storage.exists(f"{uri.rstrip('/')}/{STATE_FILE}")


@contextlib.contextmanager
def as_export(uri: str) -> Iterator[str]:
    """``uri`` when it is an export; the export of the training checkpoint ``uri`` (a temporary directory) else."""
    with embedded_store_for(uri):  # the default run's checkpoints live in the embedded store
        if not is_training_checkpoint(uri):
            yield uri
            return
        # Lazy: DeepSpeed's checkpoint converter loads only when a training checkpoint is given.
        from megl_ray.training.checkpoint_export import export_checkpoint  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="megl-checkpoint-export-") as tmp:
            log.info("%s is a training checkpoint: exporting it first (export --from-checkpoint)", uri)
            export_checkpoint(uri, tmp)
            yield tmp
