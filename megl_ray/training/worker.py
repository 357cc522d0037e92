"""The per-worker training loop that Ray Train runs on every worker: DeepSpeed ZeRO on Ray's process group.

Checkpoints hold the DeepSpeed shards of every rank plus ``train_state.json`` (epoch, optimizer step, the ids
already trained in the current epoch, the resolved config) and one RNG file per rank. Resuming mid-epoch trains
exactly the rest of that epoch: the ids not yet seen are dealt out evenly to the workers, so no sample is seen
twice, none is missed, and the number of optimizer steps is the planned one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megl_ray.config import MEGLConfig, config_from_dict
from megl_ray.errors import ConfigError

log = logging.getLogger("megl_ray.train")
DS_TAG = "megl"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    epoch: int = 0
    """The epoch in progress (or the next one, when ``epoch_ids`` is empty)."""
    step: int = 0
    """Optimizer steps taken so far."""
    epoch_ids: list[str] = field(default_factory=list)
    """Ids of the samples already trained in ``epoch``."""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Micro-batches per worker and epoch: the split is padded to a multiple of the worker count."""
    return math.ceil(math.ceil(rows / world) / batch_size)


# ------------------------------------------------------------------------------------------------ checkpoints


def _weights_only_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed load its checkpoint files with ``torch.load(weights_only=True)``: a checkpoint read back
    from shared storage must not be able to run code. Its files hold tensors, numbers, strings and a few
    DeepSpeed enums, which are allow-listed."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum
            from deepspeed.utils.tensor_fragment import fragment_address

            allowed = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, set, argparse.Namespace]
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if isinstance(current, TorchCheckpointEngine):
        replacement = WeightsOnly.__new__(WeightsOnly)
        replacement.__dict__.update(current.__dict__)
        engine.checkpoint_engine = replacement
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "checkpoint_engine"):
            optimizer.checkpoint_engine = replacement


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_checkpoint(engine: Any, state: TrainState, directory: Path, rank: int) -> None:
    """Every rank writes its DeepSpeed shard (a collective call), its RNG state, and rank 0 the train state."""
    engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=True)
    rng = _rng_state()
    torch.save({"torch": rng["torch"], "numpy_state": torch.tensor(rng["numpy"][1].astype(np.int64)),
                "numpy_pos": torch.tensor(int(rng["numpy"][2])), "python": torch.tensor(rng["python"][1])},
               directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), default=str))


def load_checkpoint(engine: Any, directory: Path, rank: int) -> TrainState:
    _weights_only_checkpoint_engine(engine)
    path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_lr_scheduler_states=True,
                                     load_optimizer_states=True)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")
    raw = json.loads((directory / STATE_FILE).read_text())
    state = TrainState(**raw)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy_state"].numpy().astype(np.uint32), int(rng["numpy_pos"]), 0, 0.0))
        random.setstate((3, tuple(int(x) for x in rng["python"].tolist()), None))
    return state


# ------------------------------------------------------------------------------------------------ the loop


class Progress:
    """Rank 0's progress line and TensorBoard scalars."""

    def __init__(self, total_steps: int, log_every: int, tb_dir: Path | None):
        self.total = total_steps
        self.log_every = log_every
        self.start = time.monotonic()
        self.window = (time.monotonic(), 0, 0)
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))

    def step(self, step: int, epoch: int, epochs: int, terms: dict[str, float], samples: int, tokens: int,
             lr: float) -> dict[str, float]:
        t0, s0, k0 = self.window
        self.window = (t0, s0 + samples, k0 + tokens)
        if step % self.log_every and step != self.total:
            return {}
        now = time.monotonic()
        elapsed = max(now - t0, 1e-9)
        rates = {"samples_per_s": self.window[1] / elapsed, "tokens_per_s": self.window[2] / elapsed}
        self.window = (now, 0, 0)
        peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss()) / 2**20
        values = {**terms, **rates, "lr": lr, "peak_mem_mib": peak}
        eta = (now - self.start) / max(step, 1) * (self.total - step)
        print(f"[megl] epoch {epoch + 1}/{epochs} step {step}/{self.total} "
              + " ".join(f"{k}={v:.4g}" for k, v in values.items()) + f" eta={eta:.0f}s",
              file=sys.stderr, flush=True)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        return values

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()


def _peak_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _all_gather_ids(ids: list[str], world: int) -> list[str]:
    import torch.distributed as dist

    if world == 1:
        return list(ids)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, list(ids))
    return [i for part in gathered for i in part]


def _all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def _validate(engine: Any, shard: Any, cfg: MEGLConfig, num_image_tokens: int, num_classes: int) -> dict[str, float]:
    """Validation accuracy and mIoU over this worker's share of the split, with the evaluation's own metric code
    (torchmetrics states, synchronised across the workers at ``compute``)."""
    from megl_ray.data.pipeline import iter_epoch
    from megl_ray.data.transforms import model_batch
    from megl_ray.metrics import ClassificationMetrics, SaliencyMetrics

    model = engine.module
    model.eval()
    classification, saliency = ClassificationMetrics(num_classes), SaliencyMetrics()
    for pre in iter_epoch(shard, epoch=0, batch_size=cfg.data.batch_size, seed=cfg.train.seed, shuffle_buffer=0):
        batch = model_batch(pre, model.tokenizer, cfg.model.prompt_template, num_image_tokens, 0, cfg.train.seed)
        real = batch["sample_weight"] > 0  # padding copies are not validation samples
        probs, sal = model.predict(batch["pixels"].to(engine.device))
        classification.update(probs.float().cpu()[real], batch["labels"][real])
        saliency.update(sal.float().cpu()[real], batch["masks"][real], batch["has_mask"][real])
    model.train()
    cls, sal_metrics = classification.compute(), saliency.compute()
    miou = sal_metrics["miou"]
    return {"val_accuracy": float(cls["accuracy"]), "val_miou": float("nan") if miou is None else float(miou)}


def _resumed_shard(cfg: MEGLConfig, loop: dict[str, Any], state: TrainState, rank: int, world: int) -> Any:
    """This worker's share of the samples of ``state.epoch`` not trained yet, padded so every worker has as many."""
    from megl_ray.data.pipeline import build_dataset

    done = set(state.epoch_ids)
    rest = sorted(i for i in loop["train_ids"] if i not in done)
    order = np.random.default_rng([cfg.train.seed, state.epoch, 7]).permutation(len(rest))
    rest = [rest[i] for i in order]
    mine = rest[rank::world]
    return build_dataset(cfg.data.uri, "train", tokenizer=loop["tokenizer"], image_size=cfg.model.image_size,
                         max_rationales=cfg.data.max_rationales, max_text_tokens=cfg.model.max_text_tokens,
                         seed=cfg.train.seed, include_ids=mine, pad_to=math.ceil(len(rest) / world))


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop`` carries the resolved config and what the driver prepared."""
    os.environ.update(loop["env"])  # S3 endpoint/credentials, DS_ACCELERATOR: before DeepSpeed is imported
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from megl_ray.data.pipeline import iter_model_batches
    from megl_ray.export import save_export
    from megl_ray.model import build_megl_model
    from megl_ray.optim import build_optimizer, build_scheduler
    from megl_ray.training.ds_config import deepspeed_config
    from megl_ray.training.guards import DIVERGED_KEY, DivergenceGuard

    cfg: MEGLConfig = config_from_dict(loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_megl_model(cfg, loop["num_classes"], tokenizer=loop["tokenizer"],
                             prior=torch.tensor(loop["prior"], dtype=torch.float32))
    if cfg.train.zero_stage == 3 and model.classifier.cam_weight is None:
        raise ConfigError("train.zero_stage=3 cannot train a classifier head without a closed-form CAM "
                          "(model.classifier_head=mlp or model.vit_pool=cls): its Grad-CAM needs a double backward, "
                          "which DeepSpeed ZeRO-3 does not support; use train.zero_stage=2")
    per_epoch = steps_per_epoch(loop["train_rows"], world, cfg.data.batch_size)
    total_steps = per_epoch * cfg.train.epochs // cfg.train.grad_accum
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=deepspeed_config(cfg, loop["use_gpu"]), dist_init_required=False)
    state = TrainState(config=loop["config"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(engine, Path(directory), rank)
        log.info("resumed from %s at epoch %d, step %d (%d samples of the epoch done)",
                 checkpoint.path, state.epoch, state.step, len(state.epoch_ids))
    start_step = state.step  # where this worker group started: 0, or the step of the checkpoint it resumed
    progress = Progress(total_steps, cfg.run.log_every, Path(loop["tb_dir"]) if rank == 0 else None)
    sample_log = None
    if cfg.train.sample_log_dir:
        Path(cfg.train.sample_log_dir).mkdir(parents=True, exist_ok=True)
        sample_log = open(Path(cfg.train.sample_log_dir) / f"samples-rank{rank}.jsonl", "a")
    guard = DivergenceGuard(cfg.train.max_nonfinite_steps, distributed=world > 1)
    kill_at = int(os.environ.get("MEGL_TEST_KILL_AT_STEP", "0"))  # test-only fault injection
    kill_marker = os.environ.get("MEGL_TEST_KILL_MARKER", "")

    def report(metrics: dict[str, Any], epoch_ids: list[str]) -> None:
        """Collective: every rank saves its shard and reports; Ray Train persists one checkpoint from all."""
        state.epoch_ids = _all_gather_ids(epoch_ids, world)
        state.metrics = metrics
        with tempfile.TemporaryDirectory(prefix="megl-ckpt-") as tmp:
            save_checkpoint(engine, state, Path(tmp), rank)
            ray.train.report({**metrics, "epoch": state.epoch, "step": state.step},
                             checkpoint=Checkpoint.from_directory(tmp))
        if rank == 0:
            progress.scalars("val", {k: v for k, v in metrics.items() if k.startswith("val_")}, state.step)
            _sync_tensorboard(loop)

    last: dict[str, float] = {}
    while state.epoch < cfg.train.epochs:
        epoch = state.epoch
        shard = (_resumed_shard(cfg, loop, state, rank, world) if state.epoch_ids
                 else ray.train.get_dataset_shard("train"))
        epoch_ids = list(state.epoch_ids) if rank == 0 else []  # rank 0 carries the already-done ids forward
        for ids, batch in iter_model_batches(
                shard, tokenizer=model.tokenizer, template=cfg.model.prompt_template,
                num_image_tokens=model.num_image_tokens, epoch=epoch, batch_size=cfg.data.batch_size,
                seed=cfg.train.seed, rank=rank, shuffle_buffer=cfg.data.shuffle_buffer, with_ids=True):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            epoch_ids.extend(ids)
            if sample_log is not None:
                sample_log.write(json.dumps({"epoch": epoch, "step": engine.global_steps, "ids": ids,
                                             "start_step": start_step, "rank": rank}) + "\n")
                sample_log.flush()
            if not engine.is_gradient_accumulation_boundary():
                continue
            state.step = engine.global_steps
            if guard.update(out.loss, state.step):  # every rank agrees: stop now, export nothing
                break
            if kill_at and state.step == kill_at and rank == world - 1 and kill_marker and not Path(kill_marker).exists():
                Path(kill_marker).write_text("killed")
                log.warning("test hook: killing rank %d at step %d", rank, state.step)
                time.sleep(5)  # let the controller register the last reported checkpoint, as a real crash would
                os._exit(1)
            terms = {k: float(v) for k, v in out.terms.items()}
            values = progress.step(state.step, epoch, cfg.train.epochs, terms, samples=len(ids) * world,
                                   tokens=int(batch["attention_mask"].sum()) * world,
                                   lr=scheduler_lr(engine)) if rank == 0 else {}
            last = values or last
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                report(dict(terms), epoch_ids)
        if guard.message:
            ray.train.report({DIVERGED_KEY: guard.message, "epoch": state.epoch, "step": state.step})
            return
        val = _validate(engine, ray.train.get_dataset_shard("val"), cfg, model.num_image_tokens,
                        loop["num_classes"])
        if rank == 0:
            print(f"[megl] epoch {epoch + 1}/{cfg.train.epochs} done: " +
                  " ".join(f"{k}={v:.4f}" for k, v in val.items()), file=sys.stderr, flush=True)
        state.epoch = epoch + 1
        report({**{k: float(v) for k, v in out.terms.items()}, **val}, [])
    if sample_log is not None:
        sample_log.close()
    _export(engine, cfg, loop, rank, save_export)


def scheduler_lr(engine: Any) -> float:
    return float(engine.optimizer.param_groups[0]["lr"]) if hasattr(engine.optimizer, "param_groups") else 0.0


def _sync_tensorboard(loop: dict[str, Any]) -> None:
    from megl_ray import storage

    try:
        storage.upload(loop["tb_dir"], loop["run_uri"] + "/tensorboard")
    except Exception as err:  # logs are a convenience: never fail training over them
        log.warning("could not upload TensorBoard logs: %s", err)


def _export(engine: Any, cfg: MEGLConfig, loop: dict[str, Any], rank: int, save_export: Any) -> None:
    """Consolidated weights for evaluation: ZeRO-3 shards are gathered (collectively), rank 0 writes."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3
              else contextlib.nullcontext())
    with gather:
        if rank == 0:
            save_export(engine.module, cfg, loop["classes"], loop["run_uri"] + "/export",
                        extra={"data_uri": cfg.data.uri, "steps": engine.global_steps})
