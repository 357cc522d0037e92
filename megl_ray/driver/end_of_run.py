"""The end-of-run explanation gallery, drawn where the GPUs are: a Ray task holding one training worker's resources
loads the export (bf16 on a GPU), explains a few examples per class and hands back the page and its PNGs (tens of
kB each). The head node never loads the model: for the 7B preset that was ~28 GB of fp32 weights and minutes of CPU
``generate`` on a head that has neither (``cluster/aws-gpu.yaml``'s head has no GPU and ``CPU: 0``).

Which examples: the dataset's val split; else the validation carved from train (``data.val_fraction``); else the
test split (only looked at, never trained or selected on); a run with none of them says why there is no gallery.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from megl_ray.cluster.credentials import credentials_file, load_credentials
from megl_ray.driver.inputs import Splits
from megl_ray.evaluation.explanations import write_gallery
from megl_ray.evaluation.inference import load_for_inference

log = logging.getLogger("megl_ray.train")

GALLERY_PER_CLASS = 1
GALLERY_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class GallerySource:
    """The examples the gallery explains: a split of the dataset, optionally only some of its ids."""

    split: str
    ids: tuple[str, ...] | None = None
    label: str = "val"
    """What the page and the logs call them: ``val``, ``carved val`` or ``test``."""


def gallery_source(splits: Splits, has_test: bool) -> GallerySource | None:
    """Validation examples where there are any, else test examples; None when the run has neither."""
    if splits.val_source == "split":
        return GallerySource("val")
    if splits.val_source == "carved":
        return GallerySource("train", tuple(splits.val_ids or ()), "carved val")
    if has_test:
        return GallerySource("test", label="test")
    return None


def _draw(
    export_uri: str, data_uri: str, source: GallerySource, device: str, credentials: str | None
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """In the Ray task: the gallery into a temp dir, returned as (examples, {file name: bytes})."""
    load_credentials(credentials)  # a joined cluster's processes did not inherit the driver's environment
    exported, _ = load_for_inference(export_uri, device=device)  # bf16 on a GPU, loaded in that dtype
    with tempfile.TemporaryDirectory(prefix="megl-gallery-") as tmp:
        out = Path(tmp)
        examples = write_gallery(
            exported,
            export_uri,
            data_uri,
            source.split,
            GALLERY_PER_CLASS,
            out,
            num_beams=1,
            max_new_tokens=GALLERY_MAX_NEW_TOKENS,
            batch_size=32,
            ids=source.ids,
            split_label=source.label,
        )
        return examples, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def draw_gallery_remotely(
    export_uri: str,
    data_uri: str,
    source: GallerySource,
    out: Path,
    use_gpu: bool,
    cpus: float,
    env: dict[str, str],
) -> list[dict[str, Any]]:
    """The gallery drawn by a Ray task with one training worker's resources, written into ``out``; returns its
    examples."""
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus, runtime_env={"env_vars": env})(_draw)
    with credentials_file() as credentials:  # removed when the task has finished
        examples, files = ray.get(task.remote(export_uri, data_uri, source, "cuda" if use_gpu else "cpu", credentials))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / Path(name).name).write_bytes(data)  # a bare name: the task's files land in ``out`` only
    return examples


def later_command(export_uri: str, data_uri: str, split: str) -> str:
    """The command that draws a gallery by hand, where the run could not."""
    return f"python -m megl_ray.explain --checkpoint {export_uri} --gallery --data {data_uri} --split {split}"


def gallery_drawer(
    export_uri: str,
    data_uri: str,
    source: GallerySource | None,
    use_gpu: bool,
    cpus: float,
    env: dict[str, str],
) -> Callable[[Path], list[dict[str, Any]] | None] | None:
    """What ``reporting.pictures.write_pictures`` calls to draw the gallery (None: nothing to draw, said in one
    line). When no GPU is free at the end of a GPU run (a busy cluster), the gallery is skipped with one line and the
    command that draws it later: the run does not wait for a GPU that may never free."""
    if source is None:
        log.info("no explanation gallery: the run has no validation or test examples")
        return None

    def draw(folder: Path) -> list[dict[str, Any]] | None:
        if use_gpu and ray.available_resources().get("GPU", 0) < 1:
            log.warning(
                "no GPU is free to draw the explanation gallery: skipped; draw it with %s",
                later_command(export_uri, data_uri, source.split),
            )
            return None
        return draw_gallery_remotely(export_uri, data_uri, source, folder, use_gpu, cpus, env)

    return draw
