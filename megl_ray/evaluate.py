"""``python -m megl_ray.evaluate``: score an exported MEGL model on one split of a converted dataset.

    python -m megl_ray.evaluate --checkpoint URI --data URI [--split test] [--out FILE] [--num-beams 1]
        [--max-new-tokens N] [--batch-size 32] [--workers N] [--device auto] [--precision auto] [--clip-path URI]
    python -m megl_ray.evaluate --efficiency --checkpoint URI [--batch-size 32] [--warmup 2] [--repeats 5]

Classification, visual-explanation and rationale metrics (``megl_ray.metrics``, ``megl_ray.clipscore``,
``megl_ray.spice``; every key is defined in ``docs/evaluation.md``). A readable table goes to stderr, the JSON to
``--out`` (default ``<checkpoint>/eval_<split>.json``, local or ``s3://``) and, as one object, to the last stdout
line. ``--efficiency`` measures parameters, latency and throughput instead (``megl_ray.efficiency``).

Small splits run in this process. With ``--workers N`` > 1, a split of more than ``RAY_ROW_THRESHOLD`` rows, or a
driver without the GPU the model should use (a CPU head node under ``ray job submit``), Ray Data spreads prediction
and generation over actors that each hold the model: one per GPU of the cluster (``num_gpus=1``) when it has GPUs,
else CPU actors. Each process that holds the model resolves ``--device``/``--precision`` itself. Both paths feed
the model the same batches (rows [k·B, (k+1)·B) of the split) and the metrics the same outputs in the same order,
so they report identical numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.errors import UserError
from megl_ray.inference import PRECISIONS, load_for_inference, resolve_device, run_batch

__all__ = ["METRIC_KEYS", "main", "resolve_device", "run_batch", "evaluate", "score"]

log = logging.getLogger("megl_ray.evaluate")

RAY_ROW_THRESHOLD = 2048
"""Without ``--workers``, splits with more rows than this go through Ray Data."""
METRIC_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "auc", "miou", "pointing_game",
               "bleu4", "meteor", "rouge_l", "cider", "spice", "clip_score", "text_similarity")
PLACEMENT_COLUMNS = ("device", "dtype", "pid", "host", "node", "lora_merged")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model (local dir or s3://), from --export")
    p.add_argument("--data", help="converted dataset (local dir or s3://); required unless --efficiency")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--out", help="where to write the JSON (default <checkpoint>/eval_<split>.json)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width of rationale generation (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generated rationale, in tokens (default: the trained model.max_text_tokens)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--workers", type=int, default=None,
                   help=f"1: in this process; N > 1: N Ray actors (default: in this process up to "
                        f"{RAY_ROW_THRESHOLD} rows, else one actor per cluster GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs, resolved by the process holding it (auto: cuda where it sees one)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="VLM weights at inference (auto: bf16 on cuda, fp32 on cpu); the classifier stays fp32")
    p.add_argument("--clip-path", help="CLIP checkpoint dir (local or s3://) for CLIPScore; without it the key is null")
    p.add_argument("--efficiency", action="store_true",
                   help="measure parameters, latency and images/s (paper Table 5) instead of scoring a split")
    p.add_argument("--warmup", type=int, default=2, help="--efficiency: untimed calls before timing")
    p.add_argument("--repeats", type=int, default=5, help="--efficiency: timed calls; the median is reported")
    return p


# --------------------------------------------------------------------------------------------------- prediction


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _clip_scorer(clip_path: str | None, device: str) -> Any:
    if not clip_path:
        return None
    from megl_ray.clipscore import CLIPScorer

    return CLIPScorer(clip_path, device=device)


def predict_in_process(exported: Any, table: pa.Table, mask_size: int, batch_size: int, num_beams: int,
                       max_new_tokens: int | None, clip: Any = None) -> dict[str, np.ndarray]:
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

    def __init__(self, checkpoint: str, device: str, precision: str, clip_path: str | None, mask_size: int,
                 num_beams: int, max_new_tokens: int | None):
        self.exported, self.error, self.clip, self.placement = None, None, None, None
        try:
            self.exported, self.placement = load_for_inference(checkpoint, device, precision)
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
            out = run_batch(self.exported, group.to_pydict(), self.mask_size, self.num_beams, self.max_new_tokens,
                            self.clip)
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
    import ray

    from megl_ray.training.ray_env import local_ray_undone

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
        raise UserError("--device cuda: the Ray cluster has no GPU; give --workers N to wait for N GPU actors "
                        "(an autoscaler adds GPU nodes) or use --device cpu")
    if workers is None:
        workers = gpus if use_gpu else max(2, int(cluster.get("CPU", 2)) // 2)
    return max(1, min(workers, rows)), use_gpu


def predict_with_ray(ray: Any, checkpoint: str, table: pa.Table, mask_size: int, batch_size: int, num_beams: int,
                     max_new_tokens: int | None, workers: int, use_gpu: bool, device: str, precision: str,
                     clip_path: str | None) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The same predictions through Ray Data: one block per in-process batch, ``workers`` model-holding actors.
    Returns (outputs in row order, where each actor ran)."""
    import ray.data

    from megl_ray.data.pipeline import configure_data_context

    configure_data_context()
    n = table.num_rows
    indexed = table.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
    indexed = indexed.append_column("_batch", pa.array(np.arange(n, dtype=np.int64) // batch_size))
    blocks = [indexed.slice(start, batch_size) for start in range(0, n, batch_size)]
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    ds = ray.data.from_arrow(blocks).map_batches(
        Predictor, batch_size=batch_size, batch_format="pyarrow",
        # two batches in flight per actor: the next one is in the actor while the current one generates
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if use_gpu else device,
                               "precision": precision, "clip_path": clip_path, "mask_size": mask_size,
                               "num_beams": num_beams, "max_new_tokens": max_new_tokens},
        **resources)
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


# ------------------------------------------------------------------------------------------------------ scoring


def score(outputs: dict[str, np.ndarray], references: list[list[str]], classes: list[str],
          batch_size: int) -> dict[str, Any]:
    """Feed the streaming metrics batch by batch, as the training loop's validation does, and compute them.
    ``not_computed`` names each null text metric with the reason."""
    from megl_ray.clipscore import NO_CLIP_REASON, corpus_clip_score
    from megl_ray.metrics import ClassificationMetrics, SaliencyMetrics, TextMetrics, java_available
    from megl_ray.spice import spice

    cls, sal, text = ClassificationMetrics(len(classes), classes), SaliencyMetrics(), TextMetrics()
    n = len(outputs["label"])
    for start in range(0, n, batch_size):
        s = slice(start, start + batch_size)
        cls.update(torch.as_tensor(outputs["probs"][s]), torch.as_tensor(outputs["label"][s]))
        sal.update(torch.as_tensor(outputs["saliency"][s]), torch.as_tensor(outputs["mask"][s]).float() / 255.0,
                   torch.as_tensor(outputs["has_mask"][s]))
        text.update([str(g) for g in outputs["generated"][s]], references[s])
    result = {**cls.compute(), **sal.compute(), **text.compute()}
    result["spice"], spice_reason = spice(text.hypotheses, text.references)
    result["clip_score"] = corpus_clip_score(outputs.get("clip_score"))
    reasons = {"spice": spice_reason, "clip_score": None if "clip_score" in outputs else NO_CLIP_REASON}
    if result["meteor"] is None:
        reasons["meteor"] = ("java is not on PATH (METEOR runs meteor-1.5.jar)" if not java_available()
                             else "meteor-1.5.jar failed (see the log)")
    result["not_computed"] = {k: v for k, v in reasons.items() if v is not None}
    return result


def _fmt(value: Any) -> str:
    return "  n/a " if value is None else f"{value:6.4f}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary printed to stderr."""
    r = result
    lines = [
        f"MEGL evaluation of {r['checkpoint']} on {r['data']} [{r['split']}]: {r['samples']} samples, "
        f"{r['mask_samples']} with a mask",
        f"  classification  accuracy {_fmt(r['accuracy'])}  macro P {_fmt(r['macro_precision'])}  "
        f"R {_fmt(r['macro_recall'])}  F1 {_fmt(r['macro_f1'])}  AUC {_fmt(r['auc'])}",
        f"  explanation     mIoU {_fmt(r['miou'])}  pointing game {_fmt(r['pointing_game'])}",
        f"  rationale       BLEU-4 {_fmt(r['bleu4'])}  METEOR {_fmt(r['meteor'])}  ROUGE-L {_fmt(r['rouge_l'])}  "
        f"CIDEr {_fmt(r['cider'])}  SPICE {_fmt(r['spice'])}  CLIPScore {_fmt(r['clip_score'])}  "
        f"MiniLM text similarity {_fmt(r['text_similarity'])}",
        *(f"  {key} is null: {why}" for key, why in sorted(r.get("not_computed", {}).items())),
        f"  {'class':<16}{'support':>8}{'predicted':>10}{'precision':>10}{'recall':>8}{'f1':>8}{'auc':>8}",
    ]
    for row in r["per_class"]:
        lines.append(f"  {row['class'][:16]:<16}{row['support']:>8}{row['predicted']:>10}{_fmt(row['precision']):>10}"
                     f"{_fmt(row['recall']):>8}{_fmt(row['f1']):>8}{_fmt(row['auc']):>8}")
    return "\n".join(lines)


def _read_export_dir(uri: str) -> tuple[dict[str, Any], Any]:
    """The export's meta.json and config, after the checks ``load_export`` makes first (for the Ray path, whose
    driver does not build the model)."""
    from megl_ray.export import check_export, load_export_config

    root, meta = check_export(uri)
    return meta, load_export_config(root, uri)


def default_out(checkpoint: str, split: str) -> str:
    return f"{checkpoint.rstrip('/')}/eval_{split}.json" if checkpoint.startswith("s3://") \
        else os.path.join(checkpoint, f"eval_{split}.json")


def _ray_candidate(args: argparse.Namespace, rows: int) -> bool:
    """Whether the Ray path may be needed: asked for, a large split, or a model that should run on a GPU this
    process lacks while a Ray cluster is at hand (a CPU head node under ``ray job submit``)."""
    local_gpu = torch.cuda.is_available()
    if args.workers is not None:
        return args.workers > 1 or (args.device == "cuda" and not local_gpu)
    if rows > RAY_ROW_THRESHOLD:
        return True
    if args.device == "cpu" or local_gpu:
        return False
    import ray

    return bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def _write_json(out: str, result: dict[str, Any]) -> None:
    from megl_ray import storage

    try:
        storage.write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as err:  # a read-only or missing location is the user's to fix (S3 errors are UserErrors)
        raise UserError(f"cannot write {out}: {err}") from None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from megl_ray.data.reader import read_split
    from megl_ray.data.schema import load_dataset_info

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
            exported, placement = load_for_inference(args.checkpoint, args.device, args.precision)
            classes, cfg, placements = exported.classes, exported.config, [placement.as_dict()]
        else:
            meta, cfg = _read_export_dir(args.checkpoint)
            classes = list(meta.get("classes", []))
        if classes != list(info.classes):
            raise UserError(f"the model's classes {classes[:5]}... differ from the dataset's "
                            f"{list(info.classes)[:5]}...: {args.checkpoint} was not trained on {args.data}")
        max_new_tokens = args.max_new_tokens or cfg.model.max_text_tokens
        log.info("evaluating %d rows of split '%s' with %s", table.num_rows, args.split,
                 "this process" if workers == 1 and not use_gpu else
                 f"{workers} Ray {'GPU' if use_gpu else 'CPU'} actors")
        if workers == 1 and not use_gpu:
            clip = _clip_scorer(args.clip_path, placement.device)
            outputs = predict_in_process(exported, table, info.mask_size, args.batch_size, args.num_beams,
                                         max_new_tokens, clip)
        else:
            outputs, placements = predict_with_ray(ray, args.checkpoint, table, info.mask_size, args.batch_size,
                                                   args.num_beams, max_new_tokens, workers, use_gpu, args.device,
                                                   args.precision, args.clip_path)
    references = [list(refs) for refs in table.column("rationales").to_pylist()]
    metrics = score(outputs, references, classes, args.batch_size)

    out = args.out or default_out(args.checkpoint, args.split)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "samples": table.num_rows,
              "num_beams": args.num_beams, "max_new_tokens": max_new_tokens, "workers": workers,
              "placement": placements, **metrics, "out": out, "seconds": round(time.monotonic() - started, 2)}
    print(format_table(result), file=sys.stderr, flush=True)
    _write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from megl_ray.training.embedded import embedded_store_for

    args = build_parser().parse_args(argv)
    with embedded_store_for(args.checkpoint, args.data, args.out):  # the default run's store, after it ended
        if args.efficiency:
            from megl_ray.efficiency import run_efficiency

            return run_efficiency(args)
        return evaluate(args)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("python -m megl_ray.evaluate", main))
