"""MEGL trained in one process, without Ray or DeepSpeed (``python -m megl_ray.train_local``).

The reference the distributed trainer is checked against (same data order, same losses), and the quickest way to
try a config on a laptop; its ``make_batch`` is the batch code the probes and benches share.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from megl_ray.config import MEGLConfig
from megl_ray.data.reader import bundled_dataset_uri, iter_row_batches, read_split
from megl_ray.data.schema import load_dataset_info
from megl_ray.data.transforms import model_batch, preprocess_rows
from megl_ray.errors import UserError
from megl_ray.model import MEGLModel, build_megl_model
from megl_ray.model.export_io import save_export
from megl_ray.model.losses import visual_ramp
from megl_ray.model.precision import autocast_dtype
from megl_ray.training.guards import DivergenceGuard
from megl_ray.training.optim import build_optimizer, build_scheduler, plain_step

log = logging.getLogger("megl_ray.train_local")


def make_batch(
    rows: list[dict[str, Any]], model: MEGLModel, cfg: MEGLConfig, mask_size: int, epoch: int
) -> dict[str, torch.Tensor]:
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    pre = preprocess_rows(
        columns,
        model.tokenizer,
        model.pixel_size,
        mask_size,
        cfg.data.max_rationales,
        cfg.model.max_text_tokens,
        cfg.model.image_aspect,
    )
    return model_batch(
        pre, model.tokenizer, cfg.model.prompt_template, model.num_image_tokens, epoch, cfg.data.rationale_seed
    )


@torch.no_grad()
def accuracy(model: MEGLModel, table, cfg: MEGLConfig, mask_size: int) -> float:
    if table.num_rows == 0:
        return float("nan")
    model.eval()
    correct = 0
    for rows in iter_row_batches(table, cfg.data.batch_size, epoch=0, seed=0, shuffle=False):
        batch = make_batch(rows, model, cfg, mask_size, epoch=0)
        probs, _ = model.predict(batch["pixels"])
        correct += int((probs.argmax(1) == batch["labels"]).sum())
    model.train()
    return correct / table.num_rows


def train(cfg: MEGLConfig, max_steps: int = 0, export: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` (``max_steps`` optimizer steps at most, 0: every epoch); write the export to ``export``
    if given."""
    started = time.monotonic()
    torch.manual_seed(cfg.train.seed)
    uri = cfg.data.uri or bundled_dataset_uri()
    info = load_dataset_info(uri)
    train_table = read_split(uri, "train", info)
    if train_table.num_rows == 0:
        raise UserError(f"dataset at {uri} has an empty train split")
    corpus = [r for rs in train_table.column("rationales").to_pylist() for r in rs] + list(info.classes)
    model = build_megl_model(cfg, info.num_classes, corpus=corpus, prior=torch.as_tensor(info.prior_array()))
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = -(-train_table.num_rows // cfg.data.batch_size)
    total = steps_per_epoch * cfg.train.epochs if not max_steps else min(max_steps, steps_per_epoch * cfg.train.epochs)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    model.train()
    step, history = 0, []
    guard = DivergenceGuard(cfg.train.max_nonfinite_steps)
    for epoch in range(cfg.train.epochs):
        for rows in iter_row_batches(train_table, cfg.data.batch_size, epoch, cfg.train.seed):
            batch = make_batch(rows, model, cfg, info.mask_size, epoch)
            batch["visual_scale"] = visual_ramp(step, total, cfg.loss.visual_ramp_start, cfg.loss.visual_ramp_end)
            half = autocast_dtype(cfg.train.precision)  # the same autocast the DeepSpeed config enables
            with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
                out = plain_step(model, optimizer, scheduler, batch, cfg.optim.grad_clip)
            step += 1
            guard.check(out.loss, step)
            terms = {k: round(v.item(), 5) for k, v in out.terms.items()}
            history.append(terms)
            log.info("epoch %d step %d/%d %s", epoch, step, total, " ".join(f"{k}={v:.4f}" for k, v in terms.items()))
            if step >= total:
                break
        val = accuracy(model, read_split(uri, "val", info), cfg, info.mask_size)
        log.info("epoch %d: val_accuracy=%.4f", epoch, val)
        if step >= total:
            break
    test = accuracy(model, read_split(uri, "test", info), cfg, info.mask_size)
    if export:
        save_export(model, cfg, info.classes, export, extra={"data_uri": uri, "steps": step})
    return {
        "export": export,
        "data_uri": uri,
        "steps": step,
        "epochs": epoch + 1,
        "final": history[-1],
        "first": history[0],
        "val_accuracy": round(val, 4),
        "test_accuracy": round(test, 4),
        "seconds": round(time.monotonic() - started, 2),
    }
