"""Scoring an exported MEGL model on one split of a converted dataset: the library of ``python -m megl_ray.evaluate``
(whose docstring lists the options and what is printed and written).

Small splits run in this process. With ``workers`` > 1, a split of more than ``RAY_ROW_THRESHOLD`` rows, or a
driver without the GPU the model should use (a CPU head node under ``ray job submit``), Ray Data spreads prediction
and generation over actors that each hold the model: one per GPU of the cluster (``num_gpus=1``) when it has GPUs,
else CPU actors. Each process that holds the model resolves ``device``/``precision`` itself. Both paths feed the
model the same batches (rows [k·B, (k+1)·B) of the split) and the metrics the same outputs in the same order, so
they report identical numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from megl_ray.cluster.ray_env import local_ray_undone
from megl_ray.data.pipeline import configure_data_context
from megl_ray.data.reader import read_split
from megl_ray.data.schema import load_dataset_info
from megl_ray.errors import UserError
from megl_ray.evaluation.clipscore import CLIPScorer
from megl_ray.evaluation.efficiency import run_efficiency
from megl_ray.evaluation.inference import PRECISIONS, load_for_inference, resolve_device, run_batch
from megl_ray.evaluation.options import RAY_ROW_THRESHOLD, EvaluateOptions
from megl_ray.evaluation.scoring import METRIC_KEYS, format_table, score, write_json
from megl_ray.model.export_io import check_export, load_export_config
from megl_ray.storage.embedded_home import embedded_store_for

__all__ = ["METRIC_KEYS", "PRECISIONS", "EvaluateOptions", "evaluate", "resolve_device", "run_batch", "score"]

log = logging.getLogger("megl_ray.evaluate")

PLACEMENT_COLUMNS = ("device", "dtype", "pid", "host", "node", "lora_merged")


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _clip_scorer(clip_path: str | None, device: str) -> Any:
    if not clip_path:
        return None
    return CLIPScorer(clip_path, device=device)


def predict_in_process(
    exported: Any,
    table: pa.Table,
    mask_size: int,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int | None,
    clip: Any = None,
) -> dict[str, np.ndarray]:
    parts = []
    for start in range(0, table.num_rows, batch_size):
        columns = table.slice(start, batch_size).to_pydict()
        parts.append(run_batch(exported, columns, mask_size, num_beams, max_new_tokens, clip))
        log.info("predicted %d/%d", min(start + batch_size, table.num_rows), table.num_rows)
    return _concat(parts)


class Predictor:
    """Ray Data actor: loads the export once, on the device it resolves itself (``--device auto`` is CUDA inside
    a GPU actor whatever the driver has), and runs ``run_batch`` on each group of rows that the in-process path
    would batch together (the ``_batch`` column), whatever batches Ray hands it. Every output row carries where it
    was computed (``_device``, ``_pid``, ...), which the driver reports as ``placement``.

    A ``UserError`` while loading (say, weights that do not fit their config, or no GPU under ``--device cuda``)
    is returned as an ``_error`` column rather than raised: a failing actor constructor makes Ray retry, log
    tracebacks and die, where the user needs one line.
    """

    def __init__(
        self,
        checkpoint: str,
        device: str,
        precision: str,
        clip_path: str | None,
        mask_size: int,
        num_beams: int,
        max_new_tokens: int | None,
        base_path: tuple[str, ...] = (),
    ):
        self.exported, self.error, self.clip, self.placement = None, None, None, None
        try:
            self.exported, self.placement = load_for_inference(checkpoint, device, precision, base_path)
            self.clip = _clip_scorer(clip_path, self.placement.device)
        except UserError as err:
            self.error = str(err)
        self.mask_size, self.num_beams, self.max_new_tokens = mask_size, num_beams, max_new_tokens

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = np.asarray(batch.column("_row"), dtype=np.int64)
        if self.error is not None:
            return {"_row": rows, "_error": np.asarray([self.error] * len(rows), dtype=object)}
        keys = np.asarray(batch.column("_batch"))
        parts = []
        for key in np.unique(keys):
            group = batch.filter(pa.array(keys == key))
            out = run_batch(
                self.exported, group.to_pydict(), self.mask_size, self.num_beams, self.max_new_tokens, self.clip
            )
            out["_row"] = np.asarray(group.column("_row"), dtype=np.int64)
            parts.append(out)
        merged = _concat(parts)
        where = self.placement.as_dict()
        for name in PLACEMENT_COLUMNS:
            merged[f"_{name}"] = np.asarray([str(where[name])] * len(merged["_row"]), dtype=object)
        return merged


@contextlib.contextmanager
def ray_session() -> Iterator[Any]:
    """Ray, connected to ``RAY_ADDRESS`` when set, else a local instance; shut down only if started here."""
    started_here = not ray.is_initialized()
    with local_ray_undone():  # a local Ray's token authentication must not outlive it (see ray_env)
        if started_here:
            ray.init(include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            if started_here:
                ray.shutdown()


def plan_actors(workers: int | None, device: str, rows: int, cluster: dict[str, float]) -> tuple[int, bool]:
    """(number of actors, whether each takes a GPU) for the Ray path, from the cluster's resources: one actor per
    GPU on a GPU cluster (``--device auto|cuda``), else max(2, CPUs // 2) CPU actors; ``workers`` overrides the
    count. ``--device cuda`` with ``--workers`` on a cluster without GPUs yet is allowed: an autoscaler adds them."""
    gpus = int(cluster.get("GPU", 0))
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu and workers is None and gpus == 0:
        raise UserError(
            "--device cuda: the Ray cluster has no GPU; give --workers N to wait for N GPU actors "
            "(an autoscaler adds GPU nodes) or use --device cpu"
        )
    if workers is None:
        workers = gpus if use_gpu else max(2, int(cluster.get("CPU", 2)) // 2)
    return max(1, min(workers, rows)), use_gpu


def predict_with_ray(
    ray: Any,
    checkpoint: str,
    table: pa.Table,
    mask_size: int,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int | None,
    workers: int,
    use_gpu: bool,
    device: str,
    precision: str,
    clip_path: str | None,
    base_path: tuple[str, ...] = (),
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The same predictions through Ray Data: one block per in-process batch, ``workers`` model-holding actors.
    Returns (outputs in row order, where each actor ran)."""
    configure_data_context()
    n = table.num_rows
    indexed = table.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
    indexed = indexed.append_column("_batch", pa.array(np.arange(n, dtype=np.int64) // batch_size))
    blocks = [indexed.slice(start, batch_size) for start in range(0, n, batch_size)]
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    ds = ray.data.from_arrow(blocks).map_batches(
        Predictor,
        batch_size=batch_size,
        batch_format="pyarrow",
        # two batches in flight per actor: the next one is in the actor while the current one generates
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "device": "cuda" if use_gpu else device,
            "precision": precision,
            "clip_path": clip_path,
            "mask_size": mask_size,
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "base_path": base_path,
        },
        **resources,
    )
    parts = []
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if "_error" in part:
            raise UserError(str(part["_error"][0]))
        parts.append(part)
    merged = _concat([{k: np.asarray(v) for k, v in p.items()} for p in parts])
    order = np.argsort(merged.pop("_row"), kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    where = np.stack([merged.pop(f"_{name}") for name in PLACEMENT_COLUMNS], axis=1)
    placements = [dict(zip(PLACEMENT_COLUMNS, row)) for row in sorted({tuple(r) for r in where.tolist()})]
    for p in placements:
        p["pid"], p["lora_merged"] = int(p["pid"]), int(p["lora_merged"])
        p["node"] = None if p["node"] == "None" else p["node"]
    return merged, placements


def _read_export_dir(uri: str) -> tuple[dict[str, Any], Any]:
    """The export's meta.json and config, after the checks ``load_export`` makes first (for the Ray path, whose
    driver does not build the model)."""
    root, meta = check_export(uri)
    return meta, load_export_config(root, uri)


def default_out(checkpoint: str, split: str) -> str:
    return (
        f"{checkpoint.rstrip('/')}/eval_{split}.json"
        if checkpoint.startswith("s3://")
        else os.path.join(checkpoint, f"eval_{split}.json")
    )


def _ray_candidate(args: EvaluateOptions, rows: int) -> bool:
    """Whether the Ray path may be needed: asked for, a large split, or a model that should run on a GPU this
    process lacks while a Ray cluster is at hand (a CPU head node under ``ray job submit``)."""
    local_gpu = torch.cuda.is_available()
    if args.workers is not None:
        return args.workers > 1 or (args.device == "cuda" and not local_gpu)
    if rows > RAY_ROW_THRESHOLD:
        return True
    if args.device == "cpu" or local_gpu:
        return False

    return bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def evaluate(args: EvaluateOptions) -> dict[str, Any]:
    """Score the export ``args.checkpoint`` on ``args.split`` of ``args.data`` (see the module's docstring)."""
    started = time.monotonic()
    for name in ("num_beams", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if not args.data:
        raise UserError("--data is required (a converted dataset), unless --efficiency")
    info = load_dataset_info(args.data)
    table = read_split(args.data, args.split, info)
    if table.num_rows == 0:
        raise UserError(f"split '{args.split}' of {args.data} is empty")

    with contextlib.ExitStack() as stack:
        workers, use_gpu = 1, False
        if _ray_candidate(args, table.num_rows):
            ray = stack.enter_context(ray_session())
            cluster = ray.cluster_resources()
            # a small split on a cluster without GPUs is no faster on CPU actors: it stays here
            if args.workers is not None or table.num_rows > RAY_ROW_THRESHOLD or cluster.get("GPU"):
                workers, use_gpu = plan_actors(args.workers, args.device, table.num_rows, cluster)
        if workers == 1 and not use_gpu:
            exported, placement = load_for_inference(args.checkpoint, args.device, args.precision, args.base_path)
            classes, cfg, placements = exported.classes, exported.config, [placement.as_dict()]
        else:
            meta, cfg = _read_export_dir(args.checkpoint)
            classes = list(meta.get("classes", []))
        if classes != list(info.classes):
            raise UserError(
                f"the model's classes {classes[:5]}... differ from the dataset's "
                f"{list(info.classes)[:5]}...: {args.checkpoint} was not trained on {args.data}"
            )
        max_new_tokens = args.max_new_tokens or cfg.model.max_text_tokens
        log.info(
            "evaluating %d rows of split '%s' with %s",
            table.num_rows,
            args.split,
            "this process" if workers == 1 and not use_gpu else f"{workers} Ray {'GPU' if use_gpu else 'CPU'} actors",
        )
        if workers == 1 and not use_gpu:
            clip = _clip_scorer(args.clip_path, placement.device)
            outputs = predict_in_process(
                exported, table, info.mask_size, args.batch_size, args.num_beams, max_new_tokens, clip
            )
        else:
            outputs, placements = predict_with_ray(
                ray,
                args.checkpoint,
                table,
                info.mask_size,
                args.batch_size,
                args.num_beams,
                max_new_tokens,
                workers,
                use_gpu,
                args.device,
                args.precision,
                args.clip_path,
                args.base_path,
            )
    references = [list(refs) for refs in table.column("rationales").to_pylist()]
    metrics = score(outputs, references, classes, args.batch_size)

    out = args.out or default_out(args.checkpoint, args.split)
    result = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "split": args.split,
        "samples": table.num_rows,
        "num_beams": args.num_beams,
        "max_new_tokens": max_new_tokens,
        "workers": workers,
        "placement": placements,
        **metrics,
        "out": out,
        "seconds": round(time.monotonic() - started, 2),
    }
    print(format_table(result), file=sys.stderr, flush=True)
    write_json(out, result)
    return result


def run(options: EvaluateOptions, then: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``python -m megl_ray.evaluate``: score the split, or with ``efficiency`` measure the model; the embedded
    store of ``$MEGL_HOME`` is served again when the URIs point into it (the default run's, after it ended).
    ``then`` sees the result while that store is still served (``--track`` writes into the run directory)."""
    with embedded_store_for(options.checkpoint, options.data, options.out):
        result = run_efficiency(options) if options.efficiency else evaluate(options)
        if then is not None:
            then(result)
        return result
