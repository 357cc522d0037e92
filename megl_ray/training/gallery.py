"""The end-of-run explanation gallery, drawn by the training workers with the model they already hold: on the GPUs,
in the training precision, with no second load of the weights anywhere (a 7B model is not read again from S3, and
the head node, which has no GPU, never holds one). The page and its PNGs go back to the driver with the run's
outcome (tens of kB a picture), which writes them into the run directory and the trackers.

Which examples: the dataset's val split; else the validation carved from train (``data.val_fraction``); else the
test split (looked at, never trained or selected on); a run with none of them says why there is no gallery.
Under ZeRO-3 every rank runs the same forwards (each gathers the partitioned parameters with the others) and
transformers' ``generate`` keeps them in step (``synced_gpus``); rank 0 keeps the pictures.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megl_ray.config import MEGLConfig
from megl_ray.evaluation.explanations import write_gallery
from megl_ray.model.export_io import Exported
from megl_ray.model.precision import autocast_dtype

log = logging.getLogger("megl_ray.train")

GALLERY_PER_CLASS = 1
GALLERY_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class GallerySource:
    """The examples the gallery explains: a split of the dataset, optionally only some of its ids."""

    split: str
    ids: tuple[str, ...] | None = None
    label: str = "val"
    """What the page calls them: ``val``, ``carved val`` or ``test``."""


def gallery_source(val_source: str, val_ids: tuple[str, ...] | None, has_test: bool) -> GallerySource | None:
    """Validation examples where there are any, else test examples; None when the run has neither."""
    if val_source == "split":
        return GallerySource("val")
    if val_source == "carved":
        return GallerySource("train", tuple(val_ids or ()), "carved val")
    if has_test:
        return GallerySource("test", label="test")
    return None


def draw_gallery(
    model: Any,
    cfg: MEGLConfig,
    classes: list[str],
    source: GallerySource,
    export_uri: str,
    keep: bool,
    synced: bool,
) -> dict[str, Any] | None:
    """The gallery of ``model`` (the trained MEGL model on this worker's device) as {"examples": [...], "files":
    {name: bytes}} where ``keep`` (rank 0), else None. ``synced``: every rank runs it (ZeRO-3). A failure is a
    warning: the run's checkpoints, export and metrics stand without pictures."""
    model.eval()
    device = next(model.classifier.parameters()).device
    half = autocast_dtype(cfg.train.precision)
    # Frozen weights are 16-bit and trainable ones fp32, as in training: the same autocast runs them together
    amp = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
    model.generate_defaults = {"synced_gpus": True} if synced else {}
    exported = Exported(model=model, config=cfg, classes=list(classes), meta={})
    try:
        with tempfile.TemporaryDirectory(prefix="megl-gallery-") as tmp, amp:
            out = Path(tmp)
            examples = write_gallery(
                exported,
                export_uri,
                cfg.data.uri,
                source.split,
                GALLERY_PER_CLASS,
                out,
                num_beams=1,
                max_new_tokens=GALLERY_MAX_NEW_TOKENS,
                batch_size=32,
                ids=source.ids,
                split_label=source.label,
            )
            files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} if keep else {}
    except Exception as err:  # pictures are a report, not the run: keep what it trained
        log.warning("could not draw the explanation gallery: %s", str(err).splitlines()[0] if str(err) else err)
        return None
    finally:
        model.generate_defaults = {}
    return {"examples": examples, "files": files} if keep else None
