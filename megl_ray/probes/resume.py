"""The large-model path in miniature: N Ray Train workers train a few fixed MEGL steps under DeepSpeed with the
trainer's own pieces (model build, precision, generated DeepSpeed config, checkpoint save/load), checkpoint at step
``save_at``, finish, then rebuild everything from scratch, resume from that checkpoint and redo the remaining steps.

Reports per rank: the partitioned parameter bytes (ZeRO-3's local shards plus the small parameters it keeps
whole), the model's total parameter bytes, the losses of both runs and the checkpoint's size. Used by the mid-size
CPU test (a 12-layer CLIP tower and Qwen2 LM, ZeRO-3, bf16, LoRA, frozen vision, gradient checkpointing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from megl_ray.config import MEGLConfig, config_from_dict
from megl_ray.model import build_megl_model
from megl_ray.probes.fixed_batch import fixed_batches, run_cpu_workers
from megl_ray.training.checkpoints import TrainState, load_checkpoint, save_checkpoint
from megl_ray.training.ds_config import deepspeed_config, trainable_parameters
from megl_ray.training.optim import build_optimizer, build_scheduler


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model) over the parameters, ZeRO-3 partitions included."""
    local = total = 0
    for p in model.parameters():
        size = p.element_size()
        if hasattr(p, "ds_tensor"):  # ZeRO-3: ds_numel is the full size, ds_tensor this rank's shard
            total += p.ds_numel * size
            local += p.ds_tensor.numel() * size
        else:
            total += p.numel() * size
            local += p.numel() * size
    return local, total


def _engine(cfg: MEGLConfig, loop: dict[str, Any]):
    # Lazy: DeepSpeed picks its accelerator when imported; the probe's workers set DS_ACCELERATOR first.
    import deepspeed  # noqa: PLC0415

    torch.manual_seed(cfg.train.seed)
    model = build_megl_model(cfg, loop["num_classes"], tokenizer=loop["tokenizer"])
    optimizer = build_optimizer(model, cfg.optim, offload=cfg.train.offload == "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, loop["steps"])
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, False, trainable_parameters(model)),
        dist_init_required=False,
    )
    return engine


def resume_loop_per_worker(loop: dict[str, Any]) -> None:
    os.environ.update(loop["env"])

    torch.set_num_threads(loop.get("threads", 1))
    cfg = config_from_dict(loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine = _engine(cfg, loop)
    local, total = parameter_bytes(engine.module)
    global_batch = cfg.data.batch_size * world
    batches = fixed_batches(cfg, engine.module, loop["rows"], loop["mask_size"], global_batch, loop["steps"])
    lo, hi = rank * cfg.data.batch_size, (rank + 1) * cfg.data.batch_size
    batches = [{k: v[lo:hi] for k, v in b.items()} for b in batches]

    terms: set[str] = set()

    def step(eng, batch) -> float:
        out = eng(**batch)
        eng.backward(out.loss)
        eng.step()
        terms.update(out.terms)  # which MEGL terms were on
        loss = out.loss.detach().double()
        dist.all_reduce(loss)
        return loss.item() / world

    # One directory for all ranks (they share the machine), as the trainer's checkpoint directory is: rank 0 alone
    # writes the train state and DeepSpeed's model states, every rank its own ZeRO shards into it.
    ckpt = Path(loop["checkpoint_dir"])
    first = []
    for i, batch in enumerate(batches):
        first.append(step(engine, batch))
        if i + 1 == loop["save_at"]:
            save_checkpoint(engine, TrainState(step=i + 1), ckpt, rank)
            dist.barrier()  # every rank's files are there before anyone reads or measures the directory
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    del engine
    resumed = _engine(cfg, loop)
    state = load_checkpoint(resumed, ckpt, rank)
    second = [step(resumed, batch) for batch in batches[state.step :]]
    result = {
        "rank": rank,
        "local_param_bytes": local,
        "total_param_bytes": total,
        "losses": first,
        "resumed_losses": second,
        "resumed_from": state.step,
        "checkpoint_bytes": ckpt_bytes,
        "terms": sorted(terms),
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(loop["out"]).write_text(json.dumps(gathered))
    ray.train.report({"done": 1})


def run_resume_probe(
    cfg: MEGLConfig,
    tokenizer: Any,
    num_classes: int,
    rows: list[dict[str, Any]],
    mask_size: int,
    steps: int,
    save_at: int,
    storage_path: str,
    threads: int = 1,
) -> list[dict]:
    """``resume_loop_per_worker`` on ``cfg.train.num_workers`` CPU workers of the current Ray cluster."""
    out = Path(storage_path) / "resume-probe.json"
    checkpoint_dir = Path(storage_path) / "resume-probe-checkpoint"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run_cpu_workers(
        resume_loop_per_worker,
        cfg,
        storage_path,
        "resume-probe",
        {
            "config": cfg.to_dict(),
            "tokenizer": tokenizer,
            "num_classes": num_classes,
            "rows": rows,
            "mask_size": mask_size,
            "steps": steps,
            "save_at": save_at,
            "threads": threads,
            "out": str(out),
            "checkpoint_dir": str(checkpoint_dir),
        },
    )
    return json.loads(out.read_text())
