"""The DeepSpeed configuration, generated from the typed config (never hand-written, so it cannot disagree).

The global batch is derived: micro batch × gradient accumulation × number of workers. Precision (``train.precision``,
bf16 on GPUs and fp32 on CPUs by default) is DeepSpeed's ``torch_autocast`` section over fp32 master weights — the
mechanism and why are in ``megl_ray.model.precision``; DeepSpeed's ``bf16``/``fp16`` sections stay off. The
optimizer and schedule are our own torch objects (``megl_ray.training.optim``), handed to ``deepspeed.initialize``,
so one process without DeepSpeed and N workers with it run the same update rule.

Gradient reduction: DeepSpeed's ``reduce_bucket_size`` defaults to 5e8 elements, allocated whole (fp32 here, the
master weights' dtype) once per communication dtype and twice under ``overlap_comm`` — 7.45 GiB per GPU for a LoRA
run whose trainable parameters fit in 0.1 GiB. The buckets are sized from the trainable parameter count instead
(``megl_ray.planning.memory_model.bucket_elements``, which the memory model uses too). Under ``torch_autocast``
DeepSpeed averages the gradients of exact ``nn.Linear``/``nn.Conv*`` parameters in 16 bits; ``train.grad_reduce_dtype``
(default fp32) keeps every gradient reduction in fp32 by listing no lower-precision-safe module.
"""

from __future__ import annotations

from typing import Any

from megl_ray.config import MEGLConfig
from megl_ray.planning.memory_model import PREFETCH_BUCKET, bucket_elements


def global_batch_size(cfg: MEGLConfig) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum * cfg.train.num_workers


def resolve_precision(cfg: MEGLConfig, use_gpu: bool) -> str:
    """``train.precision`` or its default: bf16 on GPUs, fp32 on CPUs."""
    return cfg.train.precision or ("bf16" if use_gpu else "fp32")


def trainable_parameters(model: Any) -> int:
    """Elements of ``model``'s trainable parameters (what ``deepspeed_config`` sizes the buckets from)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def deepspeed_config(cfg: MEGLConfig, use_gpu: bool, trainable: int | None = None) -> dict[str, Any]:
    """The config for a model with ``trainable`` trainable parameters (None: unknown, DeepSpeed's 5e8 buckets)."""
    bucket = bucket_elements(trainable)
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage, "reduce_bucket_size": bucket}
    if cfg.train.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = bucket  # chunks of the updated partitions' all-gather after the step
    if cfg.train.zero_stage >= 2:
        # Overlapping communication with the backward needs CUDA streams; on CPU it only adds copies.
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if cfg.train.zero_stage == 3:
        # Keep small parameters (norms, biases, the CAM head) whole: gathering them costs more than it saves.
        zero.update(stage3_param_persistence_threshold=100_000, stage3_prefetch_bucket_size=PREFETCH_BUCKET)
    if cfg.train.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        if cfg.train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": global_batch_size(cfg),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: the same optimizer as the single-process trainer
        "steps_per_print": 10**9,  # our own progress report; DeepSpeed's would interleave with it
        "wall_clock_breakdown": False,
    }
    precision = resolve_precision(cfg, use_gpu)
    if precision != "fp32":
        autocast: dict[str, Any] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
        if cfg.train.grad_reduce_dtype == "fp32":
            # DeepSpeed tags the parameters of these module classes to be averaged in 16 bits; none: all in fp32.
            autocast["lower_precision_safe_modules"] = []
        config["torch_autocast"] = autocast
    return config
