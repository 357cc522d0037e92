"""The sections of the config that say how a model is trained and where its run goes: the optimiser
(``optim``), the schedule and its distribution (``train``), the run's storage, tracking and checkpoints (``run``).
Part of the one typed configuration of ``megl_config``, which holds the model, loss and data sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megl_ray.config.build import check_value as _check
from megl_ray.config.safe_io import check_name


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    classifier_lr: float | None = None
    """Peak learning rate of the classifier f (its own parameter groups, same schedule); None: ``lr``. A small CNN
    trained from scratch wants a larger rate than a transformer or LoRA adapters do."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(
            self.classifier_lr is None or self.classifier_lr > 0,
            "optim.classifier_lr",
            f"must be > 0, got {self.classifier_lr}",
        )


@dataclass
class TrainConfig:
    """The training schedule and its distribution."""

    epochs: int = 2
    """Number of passes over the training split."""
    seed: int = 0
    """Seed of initialisation, shuffling and rationale sampling."""
    num_workers: int = 2
    """Ray Train workers (one GPU each on a GPU cluster)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3)."""
    grad_accum: int = 1
    """Gradient-accumulation steps; the global batch is derived: batch_size × grad_accum × num_workers."""
    use_gpu: bool | None = None
    """One GPU per worker; None: whenever the cluster has GPUs."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker on CPU clusters; the rest feeds Ray Data (a whole CPU each starves it on 2 cores)."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps (0: only at the end of each epoch)."""
    max_failures: int = 2
    """Worker-group failures Ray Train recovers from (restarting from the latest checkpoint) before giving up."""
    cache_data: bool | None = None
    """Cache the preprocessed training split in Ray's object store; None: when it fits in a quarter of it."""
    precision: Literal["bf16", "fp32", "fp16"] | None = None
    """Training precision: ``bf16`` (autocast over fp32 master weights; frozen weights in bf16), ``fp32``, or
    ``fp16`` (pre-Ampere GPUs, with loss scaling). None: bf16 on GPUs, fp32 on CPUs. See model/precision.py."""
    grad_reduce_dtype: Literal["fp32", "autocast"] = "fp32"
    """Dtype in which DeepSpeed averages the trainable parameters' gradients across workers under bf16/fp16:
    ``fp32`` (the master weights' dtype, as the optimizer sees them) or ``autocast`` (DeepSpeed's default under
    ``torch_autocast``: gradients of exact ``nn.Linear``/``nn.Conv*`` parameters — LoRA, projector, convolutions —
    are averaged in 16 bits: half the traffic, 8 bits of mantissa, and a second reduction bucket). No effect in fp32."""
    offload: Literal["none", "cpu"] = "none"
    """ZeRO offload to host memory: ``cpu`` moves the optimizer states (and under ZeRO-3 the parameters) off the
    GPU."""
    sample_log_dir: str | None = None
    """Debugging/tests: each worker appends the sample ids of every step to a JSON-lines file in this directory."""
    max_nonfinite_steps: int = 3
    """Stop with an error once the loss has not been finite for this many optimizer steps in a row (0: never)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers (Ray Train's ``ScalingConfig.placement_strategy``): PACK fills few nodes, SPREAD
    spreads over nodes, the STRICT_ variants require it (STRICT_SPREAD: one worker per node)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.num_workers >= 1, "train.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.max_failures >= 0, "train.max_failures", f"must be >= 0, got {self.max_failures}")
        _check(
            self.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", f"must be >= 0, got {self.max_nonfinite_steps}"
        )
        _check(
            self.offload == "none" or self.zero_stage >= 1,
            "train.offload",
            "needs train.zero_stage >= 1 (ZeRO offloads its own partitions)",
        )


@dataclass
class RunConfig:
    """Where a run's checkpoints and logs go."""

    storage_path: str | None = None
    """Local directory or ``s3://bucket/prefix`` for runs; None uses the embedded default."""
    name: str = "megl"
    """Run name: re-running with the same name resumes."""
    log_every: int = 10
    """Print a progress line (and write TensorBoard scalars) every this many optimizer steps."""
    tracking: str | list[str] = "tensorboard"
    """Experiment tracking: ``none``, ``tensorboard``, ``mlflow``, ``wandb``, or a list of them. The driver logs the
    resolved config, every loss term, throughput, per-epoch validation and final test metrics and the export URI;
    a tracking failure is a warning, never the end of training (``megl_ray.reporting.tracking``)."""
    tracking_uri: str | None = None
    """MLflow tracking server, e.g. ``http://127.0.0.1:5000`` (None: ``$MLFLOW_TRACKING_URI``, else MLflow's
    default)."""
    experiment: str | None = None
    """MLflow experiment and W&B group of the run (None: ``$MLFLOW_EXPERIMENT_NAME``, else experiment ``megl``, no
    group); a sweep sets its name."""
    wandb_project: str | None = None
    """W&B project (None: ``$WANDB_PROJECT``, else ``megl_ray``; online or offline is W&B's own ``$WANDB_MODE``,
    offline runs are kept under ``$WANDB_DIR``)."""
    checkpoint_metric: str | None = None
    """Keep the best checkpoint by this reported metric (``val_accuracy``, ``val_miou``, ``loss``) beside the latest
    ones (Ray Train's ``checkpoint_score_attribute``); None: keep the latest two only."""
    checkpoint_mode: Literal["max", "min"] | None = None
    """Whether a higher or a lower ``checkpoint_metric`` is better; None: ``min`` for a loss, ``max`` otherwise."""
    export_from: Literal["best", "last"] = "best"
    """With ``checkpoint_metric``: export (and test) the best checkpoint's weights, or the last ones."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for model FLOPs utilisation (MFU); None: looked up from the GPU's name
    (bf16 datasheet figures), no MFU on CPUs."""
    shared_filesystem: bool = False
    """A local ``storage_path`` is a filesystem mounted on every node (NFS): allow it on a multi-node cluster."""

    def __post_init__(self) -> None:
        problem = check_name(self.name)  # the run directory is storage_path/name: it must stay inside storage_path
        _check(problem is None, "run.name", f"{problem}, got {self.name!r}")
        _check(self.log_every >= 1, "run.log_every", f"must be >= 1, got {self.log_every}")
        _check(
            self.peak_tflops is None or self.peak_tflops > 0, "run.peak_tflops", f"must be > 0, got {self.peak_tflops}"
        )
        metrics = ("loss", "ce", "text", "visual", "dc", "val_accuracy", "val_miou")
        _check(
            self.checkpoint_metric is None or self.checkpoint_metric in metrics,
            "run.checkpoint_metric",
            f"must be one of {', '.join(metrics)}, got {self.checkpoint_metric!r}",
        )
        chosen = [self.tracking] if isinstance(self.tracking, str) else list(self.tracking)
        valid = ("none", "tensorboard", "mlflow", "wandb")
        _check(
            all(t in valid for t in chosen),
            "run.tracking",
            f"must be one of {', '.join(valid)} or a list of them, got {self.tracking!r}",
        )
