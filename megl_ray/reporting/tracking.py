"""Experiment tracking of a training run: TensorBoard, MLflow and/or W&B (``run.tracking``), from the driver.

The driver is the one place that sees the whole run: the progress of every logging step (each loss term averaged
over the window and the ranks, samples/s, tokens/s, TFLOP/s and MFU, lr per group, gradient norm, memory), each
epoch's validation metrics, the test metrics, the export URI and the end-of-run gallery (overlays and rationales as
TensorBoard images, MLflow artifacts, a W&B table). So tracking happens there, once per run, with the libraries' own
clients (``MlflowClient``, ``wandb``, ``SummaryWriter``) — the workers send their reduced numbers to the driver
(``megl_ray.reporting.progress``). ``evaluate --track`` reopens the same run (``track_evaluation``).

The standard variables count where the config says nothing: ``$MLFLOW_TRACKING_URI``, ``$MLFLOW_EXPERIMENT_NAME``,
``$WANDB_PROJECT`` (and W&B's own ``$WANDB_MODE``, ``$WANDB_DIR``).

A tracking backend that fails (server down, no W&B key, a disk full) is reported once as a warning and switched
off; training goes on. Re-running a run of the same name (a resume) continues its MLflow run and W&B run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from megl_ray import storage
from megl_ray.config import megl_home
from megl_ray.errors import UserError
from megl_ray.evaluation.scoring import METRIC_KEYS
from megl_ray.model.export_io import check_export, load_export_config
from megl_ray.reporting.pictures import local_run_dir
from megl_ray.storage.uri import run_uri as run_directory  # the Backends take a run_uri argument

log = logging.getLogger("megl_ray.train")

DEFAULT_EXPERIMENT = "megl"
DEFAULT_WANDB_PROJECT = "megl_ray"
RUN_URI_TAG = "megl.run_uri"
EXPORT_URI_TAG = "megl.export_uri"


def backends_of(tracking: str | list[str]) -> list[str]:
    """``run.tracking`` as a list of backend names without duplicates (``none`` alone means none)."""
    chosen = [tracking] if isinstance(tracking, str) else list(tracking)
    return [name for i, name in enumerate(chosen) if name != "none" and name not in chosen[:i]]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"classifier": "tiny"}}`` → ``{"model.classifier": "tiny"}``, as MLflow params want them."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _finite(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardBackend:
    """Event files written locally, uploaded into ``<run>/tensorboard`` at each epoch and at the end."""

    def __init__(self, cfg: Any, run_uri: str, local_dir: Path) -> None:
        self.local = local_dir / "tensorboard"
        self.remote = run_uri + "/tensorboard"
        self.writer = SummaryWriter(str(self.local))

    def config(self, flat: dict[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()), 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def epoch_done(self) -> None:
        self._sync()

    def summary(self, values: dict[str, float], step: int) -> None:
        self.metrics(values, step)

    def export(self, uri: str) -> None:
        self.writer.add_text("export", uri, 0)

    def pictures(self, curves: Path | None, gallery: Path | None, examples: list[dict[str, Any]], step: int) -> None:
        if curves is not None:
            self.writer.add_image("curves", _pixels(curves), step, dataformats="HWC")
        for example in examples:
            tag = f"gallery/{example['id']}"
            self.writer.add_image(tag, _pixels(gallery / example["overlay"]), step, dataformats="HWC")
            self.writer.add_text(tag, _caption(example), step)
        self._sync()

    def close(self, success: bool) -> None:
        self.writer.close()
        self._sync()

    def _sync(self) -> None:
        self.writer.flush()
        storage.upload(str(self.local), self.remote)


class MlflowBackend:
    """One MLflow run per training run, in experiment ``run.experiment`` (a sweep: the sweep's name)."""

    def __init__(self, cfg: Any, run_uri: str, local_dir: Path) -> None:
        # A tracking server that is down must not hold the run for minutes of HTTP retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        # MLflow prints the run's URL to stdout when it ends; stdout's last line is the result. We log it instead.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # Lazy: MLflow is an optional extra (megl_ray[tracking]) and takes seconds to import.
        import mlflow  # noqa: PLC0415

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=cfg.run.tracking_uri)
        name = cfg.run.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except mlflow.exceptions.MlflowException:  # created meanwhile by another trial of the same sweep
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_URI_TAG}` = '{run_uri}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(
                experiment_id, run_name=cfg.run.name, tags={RUN_URI_TAG: run_uri}
            ).info.run_id
        self.resumed = bool(found)
        where = self.client.tracking_uri
        if where.startswith(("http://", "https://")):
            where = f"{where.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        log.info("MLflow run %s (experiment %s): %s", self.run_id, name, where)

    def config(self, flat: dict[str, Any]) -> None:
        if self.resumed:  # params are immutable; a resumed run was started with this config (its fingerprint)
            return
        params = [self.mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[self.mlflow.entities.Metric(k, v, now, step) for k, v in values.items()]
        )

    def epoch_done(self) -> None:
        pass

    def summary(self, values: dict[str, float], step: int) -> None:
        self.metrics(values, step)

    def export(self, uri: str) -> None:
        # A reference, not a copy: the weights stay in the run directory (they may be gigabytes).
        self.client.set_tag(self.run_id, EXPORT_URI_TAG, uri)
        self.client.log_dict(
            self.run_id,
            {"export_uri": uri, "load_with": "megl_ray.model.export_io.load_export"},
            "export_reference.json",
        )

    def pictures(self, curves: Path | None, gallery: Path | None, examples: list[dict[str, Any]], step: int) -> None:
        if curves is not None:
            self.client.log_artifact(self.run_id, str(curves))
        if gallery is not None:  # index.html and its PNGs: MLflow's UI shows both
            self.client.log_artifacts(self.run_id, str(gallery), "gallery")

    def close(self, success: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if success else "FAILED")


class WandbBackend:
    """One W&B run per training run (id derived from the run URI, so a resume continues it), grouped by
    ``run.experiment``. Online or offline is W&B's ``$WANDB_MODE``."""

    def __init__(self, cfg: Any, run_uri: str, local_dir: Path) -> None:
        # Lazy: W&B is an optional extra (megl_ray[tracking]) and takes seconds to import.
        import wandb  # noqa: PLC0415

        directory = Path(os.environ.get("WANDB_DIR") or megl_home() / "wandb")
        directory.mkdir(parents=True, exist_ok=True)
        run_id = cfg.run.name[:40] + "-" + hashlib.sha256(run_uri.encode()).hexdigest()[:8]
        self.run = wandb.init(
            project=cfg.run.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
            name=cfg.run.name,
            group=cfg.run.experiment,
            id=run_id,
            resume="allow",
            dir=str(directory),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.wandb = wandb

    def config(self, flat: dict[str, Any]) -> None:
        self.run.config.update(flat, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def epoch_done(self) -> None:
        pass

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def export(self, uri: str) -> None:
        artifact = self.wandb.Artifact(f"{self.run.name}-export", type="model")
        artifact.add_reference(uri if "://" in uri else Path(uri).resolve().as_uri(), checksum=False)
        self.run.log_artifact(artifact)
        self.run.summary["export_uri"] = uri

    def pictures(self, curves: Path | None, gallery: Path | None, examples: list[dict[str, Any]], step: int) -> None:
        logged: dict[str, Any] = {}
        if curves is not None:
            logged["curves"] = self.wandb.Image(str(curves))
        if examples:
            columns = ["id", "label", "predicted", "probability", "iou", "rationale", "overlay"]
            table = self.wandb.Table(columns=columns)
            for e in examples:
                overlay = self.wandb.Image(str(gallery / e["overlay"]))
                table.add_data(*(e.get(c) for c in columns[:-1]), overlay)
            logged["gallery"] = table
        if logged:
            self.run.log(logged, step=step)

    def close(self, success: bool) -> None:
        self.run.finish(exit_code=0 if success else 1)


BACKENDS = {"tensorboard": TensorBoardBackend, "mlflow": MlflowBackend, "wandb": WandbBackend}


class Tracker:
    """Fans every record out to the chosen backends; a backend that fails once is warned about and dropped."""

    def __init__(self, cfg: Any, run_uri: str, local_dir: Path) -> None:
        self.backends: dict[str, Any] = {}
        self.step = 0
        for name in backends_of(cfg.run.tracking):
            try:
                self.backends[name] = BACKENDS[name](cfg, run_uri, local_dir)
            except Exception as err:
                log.warning("tracking: %s is off for this run: %s", name, _one_line(err))

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                log.warning("tracking: %s failed (%s); it is off for the rest of this run", name, _one_line(err))
                self.backends.pop(name, None)

    def config(self, tree: dict[str, Any]) -> None:
        self._each("config", flatten(tree))

    def metrics(self, values: dict[str, Any], step: int) -> None:
        values = _finite(values)
        self.step = max(self.step, step)
        if values:
            self._each("metrics", values, step)

    def epoch_done(self) -> None:
        self._each("epoch_done")

    def summary(self, values: dict[str, Any]) -> None:
        values = _finite(values)
        if values:
            self._each("summary", values, self.step)

    def export(self, uri: str) -> None:
        self._each("export", uri)

    def pictures(self, made: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        """The end-of-run pictures (``write_pictures``' paths and the gallery's examples) into every tracker."""
        curves = Path(made["curves"]) if "curves" in made else None
        gallery = Path(made["gallery"]).parent if "gallery" in made else None
        if curves is not None or gallery is not None:
            self._each("pictures", curves, gallery, examples if gallery is not None else [], self.step)

    def close(self, success: bool) -> None:
        self._each("close", success)
        self.backends.clear()


def track_evaluation(result: dict[str, Any]) -> list[str]:
    """``evaluate --track``: ``result``'s metrics, as ``eval/<split>/<metric>``, into the trackers of the run that
    wrote the export ``result["checkpoint"]`` — its config names them and the run: MLflow's run is found by its run
    tag, W&B's by its id, TensorBoard's event files go to the run directory. Returns the backends that took them."""
    export = result["checkpoint"]
    root, meta = check_export(export)
    cfg = load_export_config(root, export)
    if not cfg.run.storage_path:
        raise UserError(f"{export} does not name the run that wrote it (run.storage_path): nothing to track into")
    if not backends_of(cfg.run.tracking):
        raise UserError(f"{export}: its run was not tracked (run.tracking={cfg.run.tracking})")
    tracker = Tracker(cfg, run_directory(cfg.run.storage_path, cfg.run.name), local_run_dir(cfg.run.name))
    tracker.step = int(meta.get("steps", 0))  # the training step the export was written at
    split = result["split"]
    tracker.summary({f"eval/{split}/{key}": result.get(key) for key in METRIC_KEYS})
    taken = list(tracker.backends)
    tracker.close(success=True)
    return taken


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _caption(example: dict[str, Any]) -> str:
    iou = example.get("iou")
    return (
        f"**{example.get('label')}** → predicted **{example.get('predicted')}** "
        f"(p={example.get('probability', 0.0):.2f}{'' if iou is None else f', IoU={iou:.2f}'})\n\n"
        f"{example.get('rationale', '')}"
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]
