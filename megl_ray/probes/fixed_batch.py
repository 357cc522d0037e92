"""A fixed-batch training probe: the same MEGL steps run in one plain process or in N Ray Train + DeepSpeed
workers, returning the loss trajectory and step times. Used to check that the distributed configuration computes
what one process computes (tests) and what it costs (``bench/train_overhead.py``).

Every worker builds the same model from the same seed and takes its slice of the same global batch, so the mean of
the workers' losses is the single process's loss on the whole batch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from megl_ray.config import MEGLConfig, config_from_dict, megl_home
from megl_ray.model import build_megl_model
from megl_ray.training.ds_config import deepspeed_config, trainable_parameters
from megl_ray.training.local import make_batch
from megl_ray.training.optim import build_optimizer, build_scheduler, plain_step


def fixed_batches(
    cfg: MEGLConfig, model: Any, rows: list[dict[str, Any]], mask_size: int, global_batch: int, steps: int
) -> list[dict[str, torch.Tensor]]:
    """``steps`` global batches of consecutive rows (cycling), built by the trainer's own batch code."""
    batches = []
    for step in range(steps):
        chunk = [rows[(step * global_batch + i) % len(rows)] for i in range(global_batch)]
        batches.append(make_batch(chunk, model, cfg, mask_size, epoch=0))
    return batches


def run_steps(
    cfg: MEGLConfig,
    tokenizer: Any,
    num_classes: int,
    rows: list[dict[str, Any]],
    mask_size: int,
    steps: int,
    rank: int = 0,
    world: int = 1,
    deepspeed_engine: bool = False,
    use_gpu: bool = False,
) -> dict[str, list[float]]:
    """Train ``steps`` steps; returns {"losses": global mean loss per step, "step_s": seconds per step}."""
    torch.manual_seed(cfg.train.seed)
    model = build_megl_model(cfg, num_classes, tokenizer=tokenizer)
    global_batch = cfg.data.batch_size * world
    batches = fixed_batches(cfg, model, rows, mask_size, global_batch, steps)
    optimizer = build_optimizer(model, cfg.optim, offload=deepspeed_engine and cfg.train.offload == "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, max(steps, 1))
    engine = None
    if deepspeed_engine:
        # Lazy: DeepSpeed picks its accelerator when imported; in a worker, after the probe set DS_ACCELERATOR.
        import deepspeed  # noqa: PLC0415

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, use_gpu, trainable_parameters(model)),
            dist_init_required=False,
        )
    losses, times = [], []
    for batch in batches:
        if world > 1:  # this rank's slice of the global batch
            lo, hi = rank * cfg.data.batch_size, (rank + 1) * cfg.data.batch_size
            batch = {k: v[lo:hi] for k, v in batch.items()}
        start = time.perf_counter()
        if engine is not None:
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
        else:
            out = plain_step(model, optimizer, scheduler, batch, cfg.optim.grad_clip)
        times.append(time.perf_counter() - start)
        loss = out.loss.detach().double()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return {"losses": losses, "step_s": times}


def probe_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop around ``run_steps`` with DeepSpeed; reports the result from every rank."""
    os.environ.update(config.get("env", {}))

    ctx = ray.train.get_context()
    torch.set_num_threads(config.get("threads", 1))
    runs = [
        run_steps(
            config_from_dict(c),
            config["tokenizer"],
            config["num_classes"],
            config["rows"],
            config["mask_size"],
            config["steps"],
            rank=ctx.get_world_rank(),
            world=ctx.get_world_size(),
            deepspeed_engine=True,
            use_gpu=config.get("use_gpu", False),
        )
        for c in config.get("variants") or [config["config"]]
    ]  # one worker group for several configs
    result = runs[0] if not config.get("variants") else {"runs": runs}
    if ctx.get_world_rank() == 0:
        # Train V2 keeps only metrics that come with a checkpoint; the probe has none, so it leaves a file.
        Path(config["out"]).write_text(json.dumps(result))
    ray.train.report(result)


def run_distributed(
    cfg: MEGLConfig,
    tokenizer: Any,
    num_classes: int,
    rows: list[dict[str, Any]],
    mask_size: int,
    steps: int,
    storage_path: str,
    name: str,
    threads: int = 1,
    variants: list[MEGLConfig] | None = None,
    extra_resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``probe_loop_per_worker`` on ``cfg.train.num_workers`` CPU workers of the current (single-machine) Ray
    cluster, placed by ``cfg.train.placement_strategy`` (``extra_resources``, e.g. a node's custom resource, pin them
    further); ``storage_path`` is a local directory. With ``variants`` the same worker group runs each config in
    turn (saving a worker-group start per config) and the result is ``{"runs": [result, ...]}``."""
    out = Path(storage_path) / f"{name}-probe.json"
    run_cpu_workers(
        probe_loop_per_worker,
        cfg,
        storage_path,
        name,
        {
            "config": cfg.to_dict(),
            "tokenizer": tokenizer,
            "num_classes": num_classes,
            "rows": rows,
            "mask_size": mask_size,
            "steps": steps,
            "threads": threads,
            "variants": [v.to_dict() for v in variants or []],
            "out": str(out),
        },
        extra_resources,
    )
    return json.loads(out.read_text())


def run_cpu_workers(
    loop_fn: Any,
    cfg: MEGLConfig,
    storage_path: str,
    name: str,
    loop: dict[str, Any],
    extra_resources: dict[str, float] | None = None,
) -> None:
    """``loop_fn(loop)`` on ``cfg.train.num_workers`` CPU Ray Train workers (DeepSpeed's CPU accelerator), placed by
    ``cfg.train.placement_strategy``; raises the workers' error."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(megl_home() / "torch_extensions")),
    }
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config={**loop, "env": env},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **(extra_resources or {})},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
