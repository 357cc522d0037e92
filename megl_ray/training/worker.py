"""The per-worker training loop: DeepSpeed ZeRO on Ray Train's process group, exact sample accounting, a checkpoint
every ``train.checkpoint_every`` steps and at each epoch's end (``checkpoints``).

Resuming mid-epoch trains exactly the rest of that epoch: the ids not yet seen are dealt out evenly to the workers,
so no sample is seen twice, none is missed, and the number of optimizer steps is the planned one. Imports DeepSpeed:
Ray Train calls ``megl_ray.training.entry.train_loop_per_worker``, which sets the environment first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
from ray.train import Checkpoint
from torch.utils.flop_counter import FlopCounterMode

from megl_ray.config import MEGLConfig
from megl_ray.data.pipeline import build_dataset, cached_share, iter_epoch, iter_model_batches
from megl_ray.data.transforms import model_batch
from megl_ray.errors import ConfigError
from megl_ray.evaluation.metrics import ClassificationMetrics, SaliencyMetrics
from megl_ray.model import build_megl_model
from megl_ray.model.export_io import exported_state, save_export
from megl_ray.model.losses import visual_ramp
from megl_ray.model.vlm import pixel_size
from megl_ray.reporting.console import configure_worker
from megl_ray.reporting.log_window import LogWindow, device_peak_tflops, peak_memory_mib
from megl_ray.reporting.progress import Progress
from megl_ray.training.accounting import (
    Accounting,
    FaultHook,
    LrScaleHook,
    epoch_seed,
    epoch_share,
    planned_steps,
    steps_per_epoch,
)
from megl_ray.training.best_checkpoint import restore_best, with_metric
from megl_ray.training.checkpoints import TrainState, load_checkpoint, save_checkpoint
from megl_ray.training.collectives import all_gather_ids, route_metric_sync
from megl_ray.training.ds_config import deepspeed_config, resolve_precision, trainable_parameters
from megl_ray.training.gallery import draw_gallery
from megl_ray.training.guards import DIVERGED_KEY, DivergenceGuard
from megl_ray.training.host_batch import ready_on_host, to_device
from megl_ray.training.optim import build_optimizer, build_scheduler
from megl_ray.training.plan import WorkerPlan
from megl_ray.training.rank_state import reseed_rank

log = logging.getLogger("megl_ray.train")
# ------------------------------------------------------------------------------------------------ the loop


def _evaluate_split(
    engine: Any, shard: Any, cfg: MEGLConfig, num_image_tokens: int, num_classes: int, prefix: str
) -> dict[str, float]:
    """``{prefix}_accuracy`` and ``{prefix}_miou`` over this worker's share of a split (validation at each epoch's
    end, test once after the export), with the evaluation's own metric code (torchmetrics states, synchronised
    across the workers at ``compute`` through the engine's device)."""
    model = engine.module
    model.eval()
    classification, saliency = ClassificationMetrics(num_classes), SaliencyMetrics()
    route_metric_sync([classification, saliency], engine.device)
    for pre in iter_epoch(shard, epoch=0, batch_size=cfg.data.batch_size, seed=cfg.train.seed, shuffle_buffer=0):
        batch = model_batch(pre, model.tokenizer, cfg.model.prompt_template, num_image_tokens, 0, cfg.train.seed)
        real = batch["sample_weight"] > 0  # padding copies are not validation samples
        probs, sal = model.predict(batch["pixels"].to(engine.device))
        classification.update(probs.float().cpu()[real], batch["labels"][real])
        saliency.update(sal.float().cpu()[real], batch["masks"][real], batch["has_mask"][real])
    model.train()
    cls, sal_metrics = classification.compute(), saliency.compute()
    miou = float("nan") if sal_metrics["miou"] is None else float(sal_metrics["miou"])
    return {f"{prefix}_accuracy": float(cls["accuracy"]), f"{prefix}_miou": miou}


def _epoch_shard(cfg: MEGLConfig, plan: WorkerPlan, epoch: int, rank: int, world: int) -> Any:
    """This worker's share of ``epoch`` as a Ray Dataset, in the epoch's seeded order (see ``accounting``)."""
    mine = epoch_share(list(plan.train_ids), cfg.train.seed, epoch, rank, world)
    pad_to = math.ceil(plan.train_rows / world)
    seed = epoch_seed(cfg.train.seed, epoch)
    if plan.train_cache is not None:
        return cached_share(plan.train_cache, mine, pad_to, seed)
    return build_dataset(
        cfg.data.uri,
        "train",
        tokenizer=plan.tokenizer,
        image_size=pixel_size(cfg.model),
        image_aspect=cfg.model.image_aspect,
        max_rationales=cfg.data.max_rationales,
        max_text_tokens=cfg.model.max_text_tokens,
        seed=seed,
        include_ids=mine,
        pad_to=pad_to,
    )


def run_worker(plan: WorkerPlan) -> None:
    """One worker's whole run: build, initialise DeepSpeed, resume, train every epoch, validate, export."""
    cfg = plan.megl_config()
    cfg.train.precision = resolve_precision(cfg, plan.use_gpu)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_worker(plan.verbose, rank, plan.use_gpu)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_megl_model(
        cfg, plan.num_classes, tokenizer=plan.tokenizer, prior=torch.tensor(plan.prior, dtype=torch.float32)
    )
    if cfg.train.zero_stage == 3 and model.classifier.cam_weight is None:
        raise ConfigError(
            "train.zero_stage=3 cannot train a classifier head without a closed-form CAM "
            "(model.classifier_head=mlp or model.vit_pool=cls): its Grad-CAM needs a double backward, "
            "which DeepSpeed ZeRO-3 does not support; use train.zero_stage=2"
        )
    per_epoch = steps_per_epoch(plan.train_rows, world, cfg.data.batch_size)
    total_steps = planned_steps(plan.train_rows, world, cfg.data.batch_size, cfg.train.epochs, cfg.train.grad_accum)
    optimizer = build_optimizer(model, cfg.optim, offload=cfg.train.offload == "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, plan.use_gpu, trainable_parameters(model)),
        dist_init_required=False,
    )
    reseed_rank(cfg.train.seed, rank)  # identical weights, different dropout masks per rank
    state = TrainState(config=plan.config, classes=list(plan.classes))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(engine, Path(directory), rank)
            state.classes = state.classes or list(plan.classes)  # a checkpoint written before they were kept
        # Checkpoints are taken at accumulation boundaries only: the window restarts at the saved position.
        engine.micro_steps = state.micro_steps
        log.info(
            "resumed from %s at epoch %d, step %d (%d samples of the epoch done)",
            checkpoint.path,
            state.epoch,
            state.step,
            len(state.epoch_ids),
        )
    start_step = state.step  # where this worker group started: 0, or the step of the checkpoint it resumed
    progress = Progress(total_steps, cfg.run.log_every, plan.board if rank == 0 else None, start_step)
    window = LogWindow(engine.device)
    peak = cfg.run.peak_tflops or (device_peak_tflops(torch.cuda.get_device_name()) if plan.use_gpu else None)
    flops_per_sample: float | None = None  # counted on this worker's first trained micro-batch
    sample_log = None
    if cfg.train.sample_log_dir:
        Path(cfg.train.sample_log_dir).mkdir(parents=True, exist_ok=True)
        sample_log = open(Path(cfg.train.sample_log_dir) / f"samples-rank{rank}.jsonl", "a")
    faults, lr_hook = FaultHook.from_env(), LrScaleHook.from_env()
    guard = DivergenceGuard(cfg.train.max_nonfinite_steps, distributed=world > 1)

    def report(metrics: dict[str, Any], acc: Accounting | None, with_checkpoint: bool = True) -> None:
        """Collective: every rank saves its shard and reports; Ray Train persists one checkpoint from all.
        ``acc``: the epoch in progress (None at an epoch's end, when the next one has not started)."""
        state.epoch_ids = all_gather_ids(acc.applied, engine.device) if acc is not None else []
        state.epoch_micro = acc.micro if acc is not None else 0
        state.micro_steps = int(engine.micro_steps)
        state.metrics = metrics
        reported = with_metric({**metrics, "epoch": state.epoch, "step": state.step}, cfg.run.checkpoint_metric)
        if with_checkpoint:
            if engine.micro_steps % cfg.train.grad_accum:
                raise RuntimeError(
                    f"checkpoint requested inside an accumulation window (micro-step "
                    f"{engine.micro_steps}, grad_accum {cfg.train.grad_accum})"
                )
            with tempfile.TemporaryDirectory(prefix="megl-ckpt-") as tmp:
                save_checkpoint(engine, state, Path(tmp), rank)
                ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(reported)

    terms = {k: v for k, v in state.metrics.items() if not k.startswith("val_")}
    validate = plan.has_val
    while state.epoch < cfg.train.epochs:
        epoch = state.epoch
        skip = state.epoch_micro  # micro-batches of this epoch already trained (a resumed run replays, skipping)
        done = set(state.epoch_ids)
        acc = Accounting()
        if skip < per_epoch:
            batches = iter_model_batches(
                _epoch_shard(cfg, plan, epoch, rank, world),
                tokenizer=model.tokenizer,
                template=cfg.model.prompt_template,
                num_image_tokens=model.num_image_tokens,
                epoch=epoch,
                batch_size=cfg.data.batch_size,
                seed=cfg.train.seed,
                rank=rank,
                shuffle_buffer=cfg.data.shuffle_buffer,
                with_ids=True,
            )
        else:  # the checkpoint fell on the epoch's last step: nothing left to train, validation still to do
            batches = iter(())
        waited_from = time.monotonic()
        for ids, batch in batches:
            window.waited(time.monotonic() - waited_from)
            if acc.micro < skip:  # replayed: the same batches as before the failure, already in the weights
                if not set(ids) <= done:
                    log.error("resumed epoch %d replays other samples than the checkpoint recorded", epoch)
                acc.consumed(ids)
                acc.applied_step()
                waited_from = time.monotonic()
                continue
            # counted on the host copy: no device sync per micro-batch
            real, tokens = int((batch["sample_weight"] > 0).sum()), int(batch["attention_mask"].sum())
            batch = {k: to_device(v, engine.device) for k, v in ready_on_host(batch).items()}
            batch["visual_scale"] = visual_ramp(
                state.step, total_steps, cfg.loss.visual_ramp_start, cfg.loss.visual_ramp_end
            )
            boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the counter
            # The model FLOPs of one sample (forward, Grad-CAM, backward), counted by torch once per worker on a
            # real micro-batch of this model: MFU for any configuration, not only the cost model's presets.
            counter = FlopCounterMode(display=False) if flops_per_sample is None else contextlib.nullcontext()
            with counter:
                out = engine(**batch)
                engine.backward(out.loss)
            if flops_per_sample is None:
                flops_per_sample = counter.get_total_flops() / len(ids)
                progress.flops(flops_per_sample, world, peak)
            engine.step()
            acc.consumed(ids)
            window.add(out.terms, real, tokens)
            if sample_log is not None:
                record = {
                    "epoch": epoch,
                    "step": engine.global_steps + (0 if boundary else 1),
                    "ids": ids,
                    "start_step": start_step,
                    "rank": rank,
                    "terms": {k: float(v) for k, v in out.terms.items()},  # a test hook: the host sync is fine
                }
                sample_log.write(json.dumps(record) + "\n")
                sample_log.flush()
            waited_from = time.monotonic()
            if not boundary:
                continue
            acc.applied_step()
            state.step = engine.global_steps
            if guard.update(out.loss, state.step):  # every rank agrees: stop now, export nothing
                break
            faults.maybe_kill(state.step, "step", rank, world, log)
            lr_hook.maybe_scale(state.step, engine.lr_scheduler, log)
            if progress.is_log_step(state.step):  # every rank: the window's reduction is a collective
                stats = window.reduce(peak_memory_mib())
                progress.step(state.step, epoch, cfg.train.epochs, stats, optimizer_values(engine))
                terms = dict(stats.terms)
            waited_from = time.monotonic()
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                report(dict(terms), acc)
        if guard.message:
            progress.outcome({DIVERGED_KEY: guard.message, "epoch": state.epoch, "step": state.step})
            return
        # The epoch's report (what Tune sees) averages what was not logged yet too (a collective: every rank)
        terms = dict(window.reduce(peak_memory_mib(), reset=False).terms) or terms
        val: dict[str, float] = {}
        if validate:
            faults.maybe_kill(state.step, "validation", rank, world, log)
            val = _evaluate_split(
                engine, ray.train.get_dataset_shard("val"), cfg, model.num_image_tokens, plan.num_classes, "val"
            )
        if rank == 0:
            progress.epoch(epoch, cfg.train.epochs, state.step, val)
        state.epoch = epoch + 1
        # An accumulation window still open at the epoch's end goes on into the next epoch: no checkpoint then.
        report({**terms, **val}, None, with_checkpoint=engine.micro_steps % cfg.train.grad_accum == 0)
    if sample_log is not None:
        sample_log.close()
    best: dict[str, Any] = {}
    if cfg.run.checkpoint_metric:
        # Export and test the best checkpoint's weights (run.export_from=best), loaded back on the workers
        scheme = "s3://" if cfg.run.storage_path.startswith("s3://") else ""
        load = cfg.run.export_from == "best"
        best = restore_best(engine, cfg.run.checkpoint_metric, cfg.checkpoint_order(), rank, scheme, load)
    test: dict[str, float] = {}
    if plan.has_test:
        # Here, not in a task of its own after training: the model is on the workers' devices already, and a new
        # process would import torch and transformers and read the export again (~10 s a run on 2 CPU cores).
        # Before the export, whose model card states them; a failure here resumes from the last checkpoint.
        test = _evaluate_split(
            engine, ray.train.get_dataset_shard("test"), cfg, model.num_image_tokens, plan.num_classes, "test"
        )
    _export(engine, cfg, plan, rank, test, best.get("uri") if best.get("exported") else None)
    gallery = None
    if plan.gallery is not None and (rank == 0 or cfg.train.zero_stage == 3):
        # Here, with the model on the workers' devices: a task of its own would load the weights again
        synced = cfg.train.zero_stage == 3 and world > 1
        gallery = draw_gallery(
            engine.module, cfg, list(plan.classes), plan.gallery, plan.run_uri + "/export", rank == 0, synced
        )
    if test or best or gallery:
        progress.outcome(
            {**test, **({"best_checkpoint": best} if best else {}), **({"gallery": gallery} if gallery else {})}
        )


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items() if math.isfinite(v)}


def optimizer_values(engine: Any) -> dict[str, float]:
    """The learning rate of every parameter group (``lr`` is the first's), the global gradient norm of the last
    step (DeepSpeed's, over every rank's partition) and the steps DeepSpeed skipped (fp16 overflow)."""
    groups = getattr(engine.optimizer, "param_groups", [])
    values = {"lr": float(groups[0]["lr"])} if groups else {}
    values.update({f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(groups)})
    norm = engine.get_global_grad_norm()
    if norm is not None:
        values["grad_norm"] = float(norm)
    values["skipped_steps"] = float(engine.skipped_steps)
    return values


def _export(
    engine: Any, cfg: MEGLConfig, plan: WorkerPlan, rank: int, test: dict[str, float], checkpoint: str | None
) -> None:
    """The export (what training changed): under ZeRO-3 gathered module by module (collectively), rank 0 writes."""
    gather = (
        (lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        if cfg.train.zero_stage == 3
        else None
    )
    state = exported_state(engine.module, cfg, gather=gather, keep=rank == 0)
    if rank == 0:
        save_export(
            engine.module,
            cfg,
            list(plan.classes),
            plan.run_uri + "/export",
            extra={
                "data_uri": cfg.data.uri,
                "steps": engine.global_steps,
                **({"checkpoint": checkpoint} if checkpoint else {}),
                **_finite(test),
            },
            state=state,
        )
