"""Per-GPU memory of a MEGL training step: parameters, gradients (with DeepSpeed's reduction buckets), optimizer
states and activations, per ZeRO stage, precision, gradient checkpointing and offload. No Ray, no torch: arithmetic
on architecture shapes, so the README's "Training a 7B model" table and ``docs/scaling.md`` come from code. Checked
term by term against what DeepSpeed really allocates (``bench/memory_model.py``, results in ``bench/results``).

What the numbers follow (DeepSpeed 0.19.8 with the config ``megl_ray.training.ds_config`` generates):
- ``precision=bf16|fp16`` is DeepSpeed's ``torch_autocast`` (see ``megl_ray.model.precision``): trainable parameters
  stay fp32 (the master weights), frozen matmul/conv/embedding weights are stored in 16 bits, norms in fp32.
- Optimizer states: 12 bytes per trainable parameter / world from ZeRO-1 on — an fp32 clone of the trainable
  partition (``single_partition_of_fp32_groups``; ZeRO-3's ``fp32_partitioned_groups_flat`` too: its branch that
  would step the fp32 partition in place compares a ``torch.device`` with a device-name string, never equal) and
  AdamW's two moments. ZeRO-0 steps the torch optimizer on the parameters: 8 bytes.
- Gradients: fp32 (the masters' dtype), partitioned from ZeRO-2 (``grads_in_partition`` / ZeRO-3's
  ``grad_partitions_flat_buffer``), plus the reduction buckets: ZeRO-2 allocates one fp32 bucket of
  ``reduce_bucket_size`` elements per communication dtype for every backward (two under ``overlap_comm``, on GPUs)
  and frees them after it; ZeRO-3 keeps one per communication dtype, in that dtype, for good. Both steps flatten the
  partition's gradients into one more fp32 tensor (ZeRO-3 per ``sub_group_size``). DeepSpeed's default bucket (5e8
  elements) costs 7.45 GiB per GPU under ZeRO-2 with 16-bit reduction of nn.Linear/Conv gradients (two dtypes × two
  buffers × 4 B) whatever the model trains, so ``ds_config`` sizes it from the trainable count (``bucket_elements``)
  and reduces in fp32 (one dtype) unless ``train.grad_reduce_dtype=autocast``.
- ZeRO-3 partitions every parameter; a gathered layer and a prefetched one are added back as the working set (not
  on one rank, where the gathered parameter is the partition itself). ``offload=cpu`` moves the optimizer
  partition, the gradient partition (ZeRO-2/3: the buckets stay) and under ZeRO-3 the parameter partition to host
  memory — read from DeepSpeed's code, not measured.
- Activations are the tensors autograd saves, counted per op of a Llama/Qwen2 (or CLIP) layer rather than from a
  published constant (Korthikanti et al.'s 34·s·b·h assumes 16-bit everything and trained weights), because what
  is saved here depends on what trains and on the ZeRO stage (``shapes.TransformerShape.layer_activation_bytes``):
  a linear saves its input only for its weight's gradient, so frozen projections save none — except under ZeRO-3,
  whose ``LinearFunctionForZeroStage3`` (installed for ``F.linear`` by ``deepspeed.initialize``) saves every input
  as it comes; the fp32-norm wrapper saves a 4-byte copy of each norm's input (8 bytes when the norm weight trains);
  peft casts a LoRA layer's input to fp32, so each adapted projection saves a dropout mask (1 byte on CUDA, 4 on
  CPU) and autocast's 16-bit cast of that input (ZeRO-3: the fp32 input itself); the residual stream is fp32 when
  the stack trains (fp32 embeddings), and each projection then saves its own 16-bit cast; SDPA/flash kernels save
  q, k, v, their output and a logsumexp, never the s² scores (the eager path's 5·a·s² bytes are kept for
  ``attn=eager``). Checkpointing keeps each layer's input plus one layer being recomputed. fp32 training is
  approximated as twice the bf16 figures (not measured).
- Autocast caches the 16-bit copy of every trainable fp32 weight it casts until the forward ends (the backward
  saves them too): 2 bytes per trainable matmul/conv parameter, 12.4 GiB for a full fine-tune of LLaVA-7B under
  ZeRO-2, checkpointing or not. Under ZeRO-3 DeepSpeed's linear casts ``weight.t()``, a view, which autocast does
  not cache (measured: none alive at the end of the forward); only the classifier's convolutions keep theirs.
- The text loss's logits: the fp32 log-softmax the loss saves (4 B per vocabulary entry and position), and at the
  start of the backward its fp32 gradient and the 16-bit logits' (6 B more), at every position or rationale
  positions only.
- Not modelled: allocator fragmentation and the CUDA context, a fixed ``overhead_gib``; world > 1 (the bench runs
  one rank: partitioning and the gathered working set follow DeepSpeed's code).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megl_ray.planning.shapes import NO_LORA, Acts, Lora, ModelShape, TransformerShape

GIB = 2**30


@dataclass(frozen=True)
class Setup:
    """How one training step runs."""

    world: int = 1
    """Data-parallel workers (GPUs) sharing the ZeRO partitions."""
    zero_stage: int = 2
    precision: str = "bf16"
    micro_batch: int = 4
    gradient_checkpointing: bool = False
    offload: str = "none"
    attn: str = "sdpa"
    rationale_only_logits: bool = True
    overhead_gib: float = 1.5
    overlap_comm: bool = True
    """DeepSpeed's ``overlap_comm`` (ZeRO-2/3): ``ds_config`` turns it on on GPUs, off on CPUs."""
    grad_reduce_dtype: str = "fp32"
    """``train.grad_reduce_dtype``: fp32, or autocast (nn.Linear/Conv gradients averaged in 16 bits)."""
    dropout_mask_bytes: int = 1
    """Bytes per element of a saved dropout mask: CUDA's fused kernel keeps bools; CPU's unfused dropout keeps the
    mask in the input's dtype (4 in peft's fp32 LoRA path)."""


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    """Gradient partitions plus the reduction buckets (``buckets``)."""
    optimizer: float
    activations: float
    """Saved activations, including autocast's cached 16-bit weight copies (``autocast_weights``)."""
    logits: float
    overhead: float
    host_offload: float = 0.0
    """Bytes held in host memory per worker (offloaded optimizer/parameters)."""
    trainable_params: int = 0
    frozen_params: int = 0
    buckets: float = 0.0
    autocast_weights: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 2) for k, v in asdict(self).items() if isinstance(v, float)}
        out["total"] = round(self.total / GIB, 2)
        out["trainable_params"], out["frozen_params"] = self.trainable_params, self.frozen_params
        return out


DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` / ``allgather_bucket_size`` (elements)."""
MIN_BUCKET = 1_000_000
"""Floor of the buckets ``ds_config`` sets: 4 MB, so that a model with next to nothing to train still reduces in
one bucket of a size collectives run efficiently at."""
SUB_GROUP = 1_000_000_000
"""ZeRO-3's ``sub_group_size`` (DeepSpeed's default; ``ds_config`` does not set it)."""
PREFETCH_BUCKET = 50_000_000
"""ZeRO-3's ``stage3_prefetch_bucket_size`` in ``ds_config`` (DeepSpeed's default)."""


def bucket_elements(trainable: int | None) -> int:
    """``reduce_bucket_size`` for a model with ``trainable`` trainable parameters: a bucket larger than everything
    there is to reduce is memory allocated for nothing at every backward (None: DeepSpeed's default)."""
    if trainable is None:
        return DEFAULT_BUCKET
    return int(min(DEFAULT_BUCKET, max(trainable, MIN_BUCKET)))


def bucket_bytes(trainable: int, setup: Setup) -> float:
    """DeepSpeed's gradient reduction buckets for ``setup`` (see the module docstring)."""
    if setup.zero_stage < 2:
        return 0.0  # ZeRO-0/1 reduce at the end of the backward, out of the gradients themselves (no hooks)
    elements = bucket_elements(trainable)
    half = setup.precision in ("bf16", "fp16")
    dtype_bytes = [4, 2] if half and setup.grad_reduce_dtype == "autocast" else [4]
    if setup.zero_stage == 3:
        return float(elements * sum(dtype_bytes))  # one bucket per communication dtype, in that dtype
    # ZeRO-2: buffers in the parameters' dtype (fp32 masters) for every communication dtype, doubled to overlap
    return float(elements * 4 * len(dtype_bytes) * (2 if setup.overlap_comm else 1))


def logits_bytes(batch: int, positions: int, vocab: int, precision: str) -> tuple[float, float]:
    """(saved, transient) bytes of the text loss's logits: the fp32 log-softmax the loss saves, and at the start of
    the backward its fp32 gradient plus the 16-bit logits' gradient."""
    n = batch * positions * vocab
    return 4.0 * n, (6.0 if precision in ("bf16", "fp16") else 4.0) * n


def model_states(trainable: int, frozen: int, setup: Setup) -> tuple[float, float, float]:
    """(parameters, gradients with buckets, optimizer states) in bytes per worker for these parameter counts,
    partitioned as ``setup``'s ZeRO stage does (ZeRO-3's gathered working layers and offload not included)."""
    if setup.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {setup.zero_stage}")
    world = max(1, setup.world)
    half = setup.precision in ("bf16", "fp16")
    param_bytes = 4.0 * trainable + (2.0 if half else 4.0) * frozen
    params = param_bytes / world if setup.zero_stage == 3 else param_bytes
    partition = trainable / (world if setup.zero_stage >= 2 else 1)
    buckets = bucket_bytes(trainable, setup)
    if setup.zero_stage == 3:  # the step flattens a sub-group's gradients into a new fp32 tensor (1e9 elements max)
        grads = 4.0 * partition + buckets + 4.0 * min(partition, SUB_GROUP)  # ZeRO-3's buckets live for good
    elif setup.zero_stage == 2:  # ZeRO-2 frees its buckets after the backward; the step flattens the partition
        grads = 4.0 * partition + max(buckets, 4.0 * partition)
    else:
        grads = 4.0 * partition
    # ZeRO-1/2/3 clone the fp32 partition as the optimizer's master (ZeRO-3's in-place branch compares a
    # torch.device with a device-name string, so it is never taken); ZeRO-0 steps the parameters themselves
    optimizer = (12.0 * trainable / world) if setup.zero_stage >= 1 else 8.0 * trainable
    return params, grads, optimizer


def world_of(setup: Setup) -> int:
    return max(1, setup.world)


def memory_per_gpu(model: ModelShape, setup: Setup) -> MemoryEstimate:
    """Bytes one worker needs for ``model`` trained as ``setup`` (see the module docstring for the rules)."""
    trainable, frozen = model.trainable_frozen()
    params, grads, optimizer = model_states(trainable, frozen, setup)
    half = setup.precision in ("bf16", "fp16")
    host = 0.0
    if setup.offload == "cpu":
        host, optimizer = optimizer, 0.0
        if setup.zero_stage == 3:  # the parameters' partition too
            host, params = host + params, 0.0
        if setup.zero_stage >= 2:  # the gradient partition is copied out of the buckets to host memory (unmeasured)
            partition = 4.0 * trainable / world_of(setup)
            host, grads = host + partition, bucket_bytes(trainable, setup)
    stacks = [(model.lm, model.image_tokens + model.text_tokens, model.lm_trains())]
    if model.vision:
        stacks.append((model.vision, model.image_tokens + 1, not model.freeze_vision))
    if setup.zero_stage == 3 and world_of(setup) > 1:  # a gathered layer and a prefetched one (one rank: in place)
        params += 2 * max(s.layer_params() * (4.0 if trains or not half else 2.0) for s, _, trains in stacks)
    b = setup.micro_batch
    ckpt = setup.gradient_checkpointing
    lora = Lora(model.lora_r, model.lora_targets, model.lora_dropout)
    act_scale = 1.0 if half else 2.0  # the per-op counts are for 16-bit autocast; fp32 doubles the 16-bit tensors
    activations = act_scale * sum(
        stack.activation_bytes(
            tokens,
            b,
            ckpt,
            Acts(
                trains=trains,
                zero3=setup.zero_stage == 3,
                flash=setup.attn in ("sdpa", "flash_attention_2"),
                mask_bytes=setup.dropout_mask_bytes,
                lora=lora if stack is model.lm else NO_LORA,
            ),
        )
        for stack, tokens, trains in stacks
    )
    classifier_act = model.classifier_act_bytes * b * (0.5 if half else 1.0)
    activations += classifier_act * (0.25 if ckpt else 1.0)  # per-stage checkpoints keep the stage inputs
    # autocast caches the 16-bit copy of each trainable fp32 weight it casts until the forward ends; under ZeRO-3
    # DeepSpeed's linear casts a transposed view, which autocast does not cache: only convolutions' copies stay
    # (an embedding table is looked up, never cast)
    cast = (
        model.classifier_params
        if setup.zero_stage == 3
        else trainable - model.lm.vocab * model.lm.hidden * model.lm_trains()
    )
    autocast_weights = 2.0 * cast if half else 0.0
    positions = model.rationale_tokens if setup.rationale_only_logits else model.image_tokens + model.text_tokens
    saved_logits, transient_logits = logits_bytes(b, positions, model.lm.vocab, setup.precision)
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activations + autocast_weights,
        logits=saved_logits + transient_logits,
        overhead=setup.overhead_gib * GIB,
        host_offload=host,
        trainable_params=trainable,
        frozen_params=frozen,
        buckets=bucket_bytes(trainable, setup),
        autocast_weights=autocast_weights,
    )


# ---------------------------------------------------------------------------------------------- named shapes

CLIP_L_336 = TransformerShape(
    layers=23, hidden=1024, intermediate=4096, heads=16, gated_mlp=False, patch_params=3 * 14 * 14 * 1024 + 577 * 1024
)
"""CLIP ViT-L/14-336 up to LLaVA's feature layer (-2): 23 of its 24 layers run."""
QWEN2_0_5B = TransformerShape(
    layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tied_embeddings=True
)
VICUNA_7B = TransformerShape(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32064)
RESNET50 = (23_508_032, 100e6)  # trunk parameters, fp32 activation bytes per 224² image
RESNET18 = (11_176_512, 25e6)

PRESETS = {
    "r50-llava-1.5-7b-lora": ModelShape(
        "r50-llava-1.5-7b-lora",
        *RESNET50,
        CLIP_L_336,
        VICUNA_7B,
        image_tokens=576,
        text_tokens=96,
        rationale_tokens=64,
        lora_r=16,
    ),
    "r50-llava-1.5-7b-full": ModelShape(
        "r50-llava-1.5-7b-full", *RESNET50, CLIP_L_336, VICUNA_7B, image_tokens=576, text_tokens=96, rationale_tokens=64
    ),
    "r18-qwen2-0.5b": ModelShape(
        "r18-qwen2-0.5b", *RESNET18, CLIP_L_336, QWEN2_0_5B, image_tokens=576, text_tokens=96, rationale_tokens=64
    ),
}


def table(rows: list[tuple[str, str, Setup]]) -> list[dict[str, object]]:
    """``(label, preset name, setup)`` rows → dicts for docs: the setup and its per-GPU GiB."""
    out = []
    for label, preset, setup in rows:
        est = memory_per_gpu(PRESETS[preset], setup)
        out.append({"setting": label, "model": preset, **asdict(setup), **est.gib()})
    return out


SETTINGS_7B = [
    ("1×80 GB, LoRA r=16", "r50-llava-1.5-7b-lora", Setup(world=1, zero_stage=2, gradient_checkpointing=True)),
    ("1×80 GB, LoRA r=16, no checkpointing", "r50-llava-1.5-7b-lora", Setup(world=1, zero_stage=2)),
    (
        "1×80 GB, full fine-tune",
        "r50-llava-1.5-7b-full",
        Setup(world=1, zero_stage=2, gradient_checkpointing=True, offload="cpu"),
    ),
    ("8×80 GB, LoRA r=16", "r50-llava-1.5-7b-lora", Setup(world=8, zero_stage=2)),
    ("8×80 GB, full fine-tune", "r50-llava-1.5-7b-full", Setup(world=8, zero_stage=3, gradient_checkpointing=True)),
    (
        "2 nodes × 8×80 GB, full fine-tune",
        "r50-llava-1.5-7b-full",
        Setup(world=16, zero_stage=3, gradient_checkpointing=True),
    ),
    (
        "8×80 GB, full fine-tune in fp32 (for comparison)",
        "r50-llava-1.5-7b-full",
        Setup(world=8, zero_stage=2, precision="fp32"),
    ),
]
"""The README's "Training a 7B model" rows: ResNet-50 + LLaVA-1.5-7B, 4 images per GPU, ~672-token sequences."""


def markdown_7b() -> str:
    """The README table, generated (tests/unit/test_memory_model.py checks the README holds exactly this)."""
    head = (
        "| setting | ZeRO | precision | checkpointing | offload | params | grads | optimizer | activations "
        "| total GiB/GPU | host GiB/GPU |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in table(SETTINGS_7B):
        lines.append(
            f"| {row['setting']} | {row['zero_stage']} | {row['precision']} | "
            f"{'on' if row['gradient_checkpointing'] else 'off'} | {row['offload']} | {row['params']} | "
            f"{row['grads']} | {row['optimizer']} | {row['activations']} | **{row['total']}** | "
            f"{row['host_offload']} |"
        )
    return "\n".join(lines)
