"""``python -m megl_ray.evaluate``: score an exported MEGL model on one split of a converted dataset.

    python -m megl_ray.evaluate --checkpoint URI --data URI [--split test] [--out FILE] [--num-beams 1]
        [--max-new-tokens 32] [--batch-size 32] [--workers N] [--device auto]

Classification, visual-explanation and rationale metrics (``megl_ray.metrics``; every key is defined in
``docs/evaluation.md``). A readable table goes to stderr, the JSON to ``--out`` (default
``<checkpoint>/eval_<split>.json``, local or ``s3://``) and, as one object, to the last stdout line.

Small splits run in this process. With ``--workers N`` > 1 (or, by default, a split of more than
``RAY_ROW_THRESHOLD`` rows) Ray Data spreads prediction and generation over N actors that each hold the model.
Both paths feed the model the same batches (rows [k·B, (k+1)·B) of the split) and the metrics the same outputs in
the same order, so they report identical numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.errors import UserError

log = logging.getLogger("megl_ray.evaluate")

RAY_ROW_THRESHOLD = 2048
"""Without ``--workers``, splits with more rows than this go through Ray Data."""
METRIC_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "auc", "miou", "pointing_game",
               "bleu4", "meteor", "rouge_l", "cider", "text_similarity")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model (local dir or s3://), from --export")
    p.add_argument("--data", required=True, help="converted dataset (local dir or s3://)")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--out", help="where to write the JSON (default <checkpoint>/eval_<split>.json)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width of rationale generation (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated rationale, in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--workers", type=int, default=None,
                   help=f"1: in this process; N > 1: N Ray actors (default: 1 up to {RAY_ROW_THRESHOLD} rows)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    return p


def resolve_device(name: str) -> str:
    """'auto' → cuda when available, else cpu; 'cuda' without a GPU is the user's error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return name


# --------------------------------------------------------------------------------------------------- prediction


def run_batch(exported: Any, columns: dict[str, list[Any]], mask_size: int, num_beams: int,
              max_new_tokens: int) -> dict[str, np.ndarray]:
    """One batch of stored rows (columnar) → targets and model outputs: label, has_mask, mask (uint8), probs,
    saliency of the predicted class, and the rationale generated for the predicted class."""
    from megl_ray.data.transforms import preprocess_rows

    model, cfg = exported.model, exported.config
    # The training transform, so that pixels are exactly what the model saw during validation (uint8-rounded).
    pre = preprocess_rows(columns, model.tokenizer, cfg.model.image_size, mask_size, 1, cfg.model.max_text_tokens)
    device = next(model.parameters()).device
    pixels = torch.as_tensor(pre["pixels"]).float().div_(255.0).to(device)
    probs, saliency = model.predict(pixels)
    names = [exported.classes[i] for i in probs.argmax(dim=1).tolist()]
    generated = model.generate(pixels, names, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return {
        "label": pre["label"], "has_mask": pre["has_mask"], "mask": pre["mask"],
        "probs": probs.float().cpu().numpy(), "saliency": saliency.float().cpu().numpy(),
        "generated": np.asarray(generated, dtype=object),
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def predict_in_process(exported: Any, table: pa.Table, mask_size: int, batch_size: int, num_beams: int,
                       max_new_tokens: int) -> dict[str, np.ndarray]:
    parts = []
    for start in range(0, table.num_rows, batch_size):
        columns = table.slice(start, batch_size).to_pydict()
        parts.append(run_batch(exported, columns, mask_size, num_beams, max_new_tokens))
        log.info("predicted %d/%d", min(start + batch_size, table.num_rows), table.num_rows)
    return _concat(parts)


class Predictor:
    """Ray Data actor: loads the export once and runs ``run_batch`` on each group of rows that the in-process path
    would batch together (the ``_batch`` column), whatever batches Ray hands it.

    A ``UserError`` while loading (say, weights that do not fit their config) is returned as an ``_error`` column
    rather than raised: a failing actor constructor makes Ray retry, log tracebacks and die, where the user needs
    one line.
    """

    def __init__(self, checkpoint: str, device: str, mask_size: int, num_beams: int, max_new_tokens: int):
        from megl_ray.export import load_export

        self.exported, self.error = None, None
        try:
            self.exported = load_export(checkpoint, device=device)
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
            out = run_batch(self.exported, group.to_pydict(), self.mask_size, self.num_beams, self.max_new_tokens)
            out["_row"] = np.asarray(group.column("_row"), dtype=np.int64)
            parts.append(out)
        return _concat(parts)


def predict_with_ray(checkpoint: str, table: pa.Table, mask_size: int, batch_size: int, num_beams: int,
                     max_new_tokens: int, workers: int, device: str) -> dict[str, np.ndarray]:
    """The same predictions through Ray Data: one block per in-process batch, ``workers`` model-holding actors."""
    import ray
    import ray.data

    from megl_ray.data.pipeline import configure_data_context

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        configure_data_context()
        n = table.num_rows
        indexed = table.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
        indexed = indexed.append_column("_batch", pa.array(np.arange(n, dtype=np.int64) // batch_size))
        blocks = [indexed.slice(start, batch_size) for start in range(0, n, batch_size)]
        resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        ds = ray.data.from_arrow(blocks).map_batches(
            Predictor, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"checkpoint": checkpoint, "device": device, "mask_size": mask_size,
                                   "num_beams": num_beams, "max_new_tokens": max_new_tokens},
            **resources)
        parts = []
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if "_error" in part:
                raise UserError(str(part["_error"][0]))
            parts.append(part)
    finally:
        if started_here:
            ray.shutdown()
    merged = _concat([{k: np.asarray(v) for k, v in p.items()} for p in parts])
    order = np.argsort(merged.pop("_row"), kind="stable")
    return {k: v[order] for k, v in merged.items()}


# ------------------------------------------------------------------------------------------------------ scoring


def score(outputs: dict[str, np.ndarray], references: list[list[str]], classes: list[str],
          batch_size: int) -> dict[str, Any]:
    """Feed the streaming metrics batch by batch, as the training loop's validation does, and compute them."""
    from megl_ray.metrics import ClassificationMetrics, SaliencyMetrics, TextMetrics

    cls, sal, text = ClassificationMetrics(len(classes), classes), SaliencyMetrics(), TextMetrics()
    n = len(outputs["label"])
    for start in range(0, n, batch_size):
        s = slice(start, start + batch_size)
        cls.update(torch.as_tensor(outputs["probs"][s]), torch.as_tensor(outputs["label"][s]))
        sal.update(torch.as_tensor(outputs["saliency"][s]), torch.as_tensor(outputs["mask"][s]).float() / 255.0,
                   torch.as_tensor(outputs["has_mask"][s]))
        text.update([str(g) for g in outputs["generated"][s]], references[s])
    return {**cls.compute(), **sal.compute(), **text.compute()}


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
        f"CIDEr {_fmt(r['cider'])}  similarity {_fmt(r['text_similarity'])}",
        f"  {'class':<16}{'support':>8}{'predicted':>10}{'precision':>10}{'recall':>8}{'f1':>8}{'auc':>8}",
    ]
    for row in r["per_class"]:
        lines.append(f"  {row['class'][:16]:<16}{row['support']:>8}{row['predicted']:>10}{_fmt(row['precision']):>10}"
                     f"{_fmt(row['recall']):>8}{_fmt(row['f1']):>8}{_fmt(row['auc']):>8}")
    return "\n".join(lines)


def _check_export_dir(uri: str) -> dict[str, Any]:
    """The export's meta.json, after the checks ``load_export`` makes first (for the Ray path, whose driver does
    not build the model)."""
    from megl_ray.export import check_export

    return check_export(uri)[1]


def default_out(checkpoint: str, split: str) -> str:
    return f"{checkpoint.rstrip('/')}/eval_{split}.json" if checkpoint.startswith("s3://") \
        else os.path.join(checkpoint, f"eval_{split}.json")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from megl_ray import storage
    from megl_ray.data.reader import read_split
    from megl_ray.data.schema import load_dataset_info

    started = time.monotonic()
    for name in ("num_beams", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    device = resolve_device(args.device)
    info = load_dataset_info(args.data)
    table = read_split(args.data, args.split, info)
    if table.num_rows == 0:
        raise UserError(f"split '{args.split}' of {args.data} is empty")
    workers = args.workers or (1 if table.num_rows <= RAY_ROW_THRESHOLD else max(2, (os.cpu_count() or 2) // 2))

    if workers == 1:
        from megl_ray.export import load_export

        exported = load_export(args.checkpoint, device=device)
        classes = exported.classes
    else:
        classes = list(_check_export_dir(args.checkpoint).get("classes", []))
    if classes != list(info.classes):
        raise UserError(f"the model's classes {classes[:5]}... differ from the dataset's {list(info.classes)[:5]}...: "
                        f"{args.checkpoint} was not trained on {args.data}")
    log.info("evaluating %d rows of split '%s' with %s", table.num_rows, args.split,
             "this process" if workers == 1 else f"{workers} Ray actors")
    if workers == 1:
        outputs = predict_in_process(exported, table, info.mask_size, args.batch_size, args.num_beams,
                                     args.max_new_tokens)
    else:
        outputs = predict_with_ray(args.checkpoint, table, info.mask_size, args.batch_size, args.num_beams,
                                   args.max_new_tokens, workers, device)
    references = [list(refs) for refs in table.column("rationales").to_pylist()]
    metrics = score(outputs, references, classes, args.batch_size)

    out = args.out or default_out(args.checkpoint, args.split)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "samples": table.num_rows,
              "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "workers": workers,
              **metrics, "out": out, "seconds": round(time.monotonic() - started, 2)}
    print(format_table(result), file=sys.stderr, flush=True)
    try:
        storage.write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as err:  # a read-only or missing location is the user's to fix (S3 errors are UserErrors)
        raise UserError(f"cannot write {out}: {err}") from None
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return evaluate(build_parser().parse_args(argv))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("python -m megl_ray.evaluate", main))
