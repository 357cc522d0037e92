"""``train --dry-run``: everything a run resolves before its first step, and nothing heavy started — the config,
the data (splits, classes, what validates), the run directory (new, resumed, complete, or another configuration
under that name), the cluster's resources against what the workers need, the plan (steps, global batch) and the
model's memory per worker.

A problem a run would stop on stops the dry run too, with the same line. The embedded default's S3 server is
started when the config points into it (it holds the data); Ray is joined only when a cluster address is given
(``--address`` or ``$RAY_ADDRESS``), never started."""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from megl_ray.config import MEGLConfig
from megl_ray.data.schema import load_dataset_info
from megl_ray.driver.embedded import embedded_default
from megl_ray.driver.inputs import plan_splits
from megl_ray.driver.ray_session import check_resources
from megl_ray.driver.run_identity import name_given, run_state
from megl_ray.model import build_megl_model
from megl_ray.model.vlm import check_model_sources, load_tokenizer
from megl_ray.planning.memory_model import PRESETS, Setup, memory_per_gpu, model_states
from megl_ray.reporting.console import configure_driver
from megl_ray.storage.uri import run_uri
from megl_ray.training.accounting import planned_steps
from megl_ray.training.ds_config import global_batch_size

GIB = 2**30


def memory_shape(cfg: MEGLConfig) -> str | None:
    """The memory model's named shape for ``cfg``'s model, when it has one (the packaged large presets)."""
    m = cfg.model
    if m.preset == "llava" and m.classifier == "resnet50":
        return "r50-llava-1.5-7b-lora" if m.lora_r > 0 else "r50-llava-1.5-7b-full"
    if m.preset == "clip-qwen2" and m.classifier == "resnet18" and m.lora_r == 0:
        return "r18-qwen2-0.5b"
    return None


def memory_estimate(cfg: MEGLConfig, use_gpu: bool, num_classes: int, tokenizer: Any) -> dict[str, Any]:
    """GiB per worker: the memory model's for a named shape; for the tiny preset (built here in a moment) its
    parameter counts and the model states the memory model gives them (weights, gradients, Adam states,
    partitioned as ZeRO does; activations not included); for other models, None and why."""
    setup = Setup(
        world=cfg.train.num_workers,
        zero_stage=cfg.train.zero_stage,
        precision=cfg.train.precision or ("bf16" if use_gpu else "fp32"),
        micro_batch=cfg.data.batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        offload=cfg.train.offload,
        attn=cfg.model.attn_implementation,
    )
    shape = memory_shape(cfg)
    if shape is not None:
        return {
            "source": f"megl_ray.planning.memory_model shape {shape}",
            **memory_per_gpu(PRESETS[shape], setup).gib(),
        }
    if cfg.model.preset != "tiny":
        return {
            "source": None,
            "why": "no shape of this model in megl_ray.planning.memory_model (it is not built "
            "in a dry run: that would load its weights)",
        }
    model = build_megl_model(cfg, num_classes, tokenizer=tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    states = sum(model_states(trainable, frozen, setup))  # the memory model's rules for these counts
    return {
        "source": "parameter count of the built model: model states only (activations not included)",
        "trainable_params": trainable,
        "frozen_params": frozen,
        "model_states": round(states / GIB, 4),
    }


def cluster_resources(address: str | None) -> tuple[dict[str, float], str]:
    """(resources, where from): the cluster's when an address is given, else this machine's (a run would start a
    local Ray with all of them)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        return dict(ray.cluster_resources()), f"Ray cluster {address}"
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}, "this machine (local Ray)"


def dry_run(
    cfg: MEGLConfig,
    address: str | None,
    config: str | None = None,
    overrides: tuple[str, ...] = (),
    verbose: bool = False,
) -> dict[str, Any]:
    """Resolve ``cfg`` (loaded from ``config`` and ``overrides``) as a run would, up to its first step; returns the
    plan as one dict."""
    configure_driver(verbose)
    named = name_given(config, overrides)  # otherwise a run takes a fresh name per invocation
    check_model_sources(cfg.model)
    with embedded_default(cfg) as resolved:
        info = load_dataset_info(resolved.data.uri)
        splits = plan_splits(resolved, info, evaluate_test=True)
        uri = run_uri(resolved.run.storage_path, resolved.run.name)
        state = run_state(resolved, uri) if named else "new (no run.name given: a fresh name per invocation)"
        resources, where = cluster_resources(address)
        use_gpu = resolved.train.use_gpu if resolved.train.use_gpu is not None else resources.get("GPU", 0) > 0
        check_resources(resolved, use_gpu, resources)
        tokenizer = load_tokenizer(resolved.model, splits.corpus + list(info.classes))
        memory = memory_estimate(resolved, use_gpu, info.num_classes, tokenizer)
        counts = dict(info.splits)
        return {
            "dry_run": True,
            "run_dir": uri,
            "run_state": state,
            "data_uri": resolved.data.uri,
            "classes": info.num_classes,
            "splits": counts,
            "train_images": len(splits.train_ids),
            **splits.summary(resolved),
            "resources": {"from": where, **resources},
            "use_gpu": use_gpu,
            "workers": resolved.train.num_workers,
            "global_batch_size": global_batch_size(resolved),
            "planned_steps": planned_steps(
                len(splits.train_ids),
                resolved.train.num_workers,
                resolved.data.batch_size,
                resolved.train.epochs,
                resolved.train.grad_accum,
            ),
            "memory_per_worker_gib": memory,
        }
