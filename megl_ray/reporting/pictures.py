"""What a finished run leaves to look at: ``curves.png`` (loss terms per step, validation metrics per epoch) and an
explanation gallery of validation examples (``megl_ray.explain``'s gallery, drawn by whoever holds the model: the
driver hands in a function, ``megl_ray.driver.end_of_run``'s Ray task), in the run directory and in a local folder
the last lines of the run name, with the commands to open them and TensorBoard."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from megl_ray import storage
from megl_ray.config import megl_home
from megl_ray.reporting.progress import SHOWN_TERMS

log = logging.getLogger("megl_ray.train")


def draw_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Loss terms against optimizer steps (left) and validation metrics against epochs (right), as one PNG."""
    matplotlib.use("Agg", force=False)  # no display needed, none opened

    steps = [e for e in history if e["kind"] == "step"]
    epochs = [e for e in history if e["kind"] == "epoch"]
    if not steps and not epochs:
        return None
    figure = Figure(figsize=(11, 4), dpi=100)
    losses, metrics = figure.subplots(1, 2)

    for term in SHOWN_TERMS:
        points = [(e["step"], e["values"][term]) for e in steps if term in e["values"]]
        if points:
            losses.plot(*zip(*points), marker=".", label=term)
    losses.set(xlabel="optimizer step", ylabel="loss", title="training loss terms")
    losses.set_yscale("symlog", linthresh=0.1)  # the terms differ by orders of magnitude
    names = sorted({k for e in epochs for k in e["values"]})
    for name in names:
        points = [(e["epoch"], e["values"][name]) for e in epochs if e["values"].get(name) == e["values"].get(name)]
        if points:
            metrics.plot(*zip(*points), marker="o", label=name)
    metrics.set(xlabel="epoch", ylabel="metric", title="validation", ylim=(0, 1.02))

    metrics.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (losses, metrics):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_pictures(
    history: Sequence[dict[str, Any]],
    run_uri: str,
    local_dir: Path,
    title: str,
    draw_gallery: Callable[[Path], list[dict[str, Any]] | None] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``curves.png`` and ``gallery/index.html`` into ``local_dir`` and the run directory; returns their paths and
    the gallery's examples (for the trackers). ``draw_gallery(folder)`` writes the gallery and returns its examples
    (None when it skipped it, saying why); without it there is no gallery.

    Either may fail (a plotting backend, a model that cannot generate): that is a warning, not a failed run."""
    local_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Any] = {}
    examples: list[dict[str, Any]] = []
    try:
        if draw_curves(history, local_dir / "curves.png", title) is not None:
            storage.upload(str(local_dir / "curves.png"), run_uri + "/curves.png")
            made["curves"] = str(local_dir / "curves.png")
    except Exception as err:
        log.warning("could not draw curves.png: %s", err)
    if draw_gallery is None:
        return made, examples
    try:
        gallery = local_dir / "gallery"
        gallery.mkdir(exist_ok=True)
        drawn = draw_gallery(gallery)
        if drawn is None:  # skipped, and said why
            return made, examples
        examples = drawn
        storage.upload(str(gallery), run_uri + "/gallery")
        made["gallery"] = str(gallery / "index.html")
        made["gallery_examples"] = len(examples)
    except Exception as err:
        log.warning("could not write the explanation gallery: %s", err)
    return made, examples


def closing_lines(made: dict[str, Any], run_uri: str, tensorboard_dir: str | None) -> list[str]:
    """The run's last stderr lines: where the pictures are and how to open them."""
    lines = []
    if "curves" in made:
        lines.append(f"[megl] curves: {made['curves']}  (also {run_uri}/curves.png)")
    if "gallery" in made:
        gallery = Path(made["gallery"])
        lines.append(
            f"[megl] gallery of {made.get('gallery_of', 'validation')} explanations: {gallery}  "
            f"(also {run_uri}/gallery/); open it "
            f"with: python -m webbrowser {gallery.as_uri()}"
        )
    if tensorboard_dir:
        lines.append(f"[megl] TensorBoard: tensorboard --logdir {tensorboard_dir}")
    return lines


def local_run_dir(run_name: str) -> Path:
    """Where a run's pictures are kept on this machine: ``$MEGL_HOME/runs/<name>`` (a temp dir if unwritable)."""
    path = megl_home() / "runs" / run_name
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"megl-{run_name}-"))
