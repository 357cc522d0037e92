"""The DeepSpeed configuration, generated from the typed config (never hand-written, so it cannot disagree).

The global batch is derived: micro batch × gradient accumulation × number of workers. On CPUs training runs in
fp32 over gloo; on GPUs in bf16. The optimizer and schedule are our own torch objects (``megl_ray.optim``), handed
to ``deepspeed.initialize``, so one process without DeepSpeed and N workers with it run the same update rule.
"""

from __future__ import annotations

from typing import Any

from megl_ray.config import MEGLConfig


def global_batch_size(cfg: MEGLConfig) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum * cfg.train.num_workers


def deepspeed_config(cfg: MEGLConfig, use_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 2:
        # Overlapping communication with the backward needs CUDA streams; on CPU it only adds copies.
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if cfg.train.zero_stage == 3:
        # Keep small parameters (norms, biases, the CAM head) whole: gathering them costs more than it saves.
        zero.update(stage3_param_persistence_threshold=100_000, stage3_prefetch_bucket_size=50_000_000)
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
    if use_gpu:
        config["bf16"] = {"enabled": True}
    return config
