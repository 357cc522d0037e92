"""Per-GPU memory of a MEGL training step: parameters, gradients, optimizer states and activations, per ZeRO stage,
precision, gradient checkpointing and offload. No Ray, no torch: arithmetic on architecture shapes, so the README's
"Training a 7B model" table and ``docs/scaling.md`` come from code rather than guesses.

What the numbers follow (DeepSpeed 0.19 with ``megl_ray.training.ds_config``):
- ``precision=bf16|fp16`` is DeepSpeed's ``torch_autocast`` (see ``megl_ray.model.precision``): *trainable* parameters
  stay fp32 (they are the master weights), their gradients are fp32; frozen parameters are stored in 16 bits (they
  have no optimizer state, so an fp32 copy would buy nothing). ``fp32``: everything 4 bytes.
- ZeRO-1/2/3 keep their own fp32 copy of the trainable partition (``single_partition_of_fp32_groups`` /
  ``fp32_partitioned_groups_flat`` are clones) plus AdamW's two moments: 12 bytes per trainable parameter, divided by
  the data-parallel world. ZeRO-0 steps the torch optimizer on the parameters: 8 bytes.
- Gradients are partitioned from ZeRO-2, parameters (trainable and frozen) at ZeRO-3, where one layer's worth of
  gathered parameters is added back as the working set.
- ``offload=cpu`` moves the optimizer partition (and, under ZeRO-3, the parameter partition) to host memory.
- Activations of a transformer layer follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", eq. 1) in 16-bit: s·b·h·34 bytes plus 5·a·s²·b for the attention scores, which SDPA/flash
  kernels never store. With checkpointing only each layer's input (2·s·b·h bytes) is kept, plus one layer being
  recomputed. The text loss's logits: fp32 over the vocabulary at every position, or at rationale positions only.
- Not modelled: allocator fragmentation, communication buckets and the CUDA context (~1–2 GiB together); the
  estimate adds a fixed ``overhead_gib``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass(frozen=True)
class TransformerShape:
    """A decoder (LM) or encoder (vision tower) stack."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int | None = None
    vocab: int = 0
    """LM vocabulary (0 for a vision tower)."""
    tied_embeddings: bool = False
    gated_mlp: bool = True
    """SwiGLU MLP (three matrices, Llama/Qwen2) or a plain two-matrix MLP (CLIP)."""
    patch_params: int = 0
    """Patch embedding and position embeddings of a vision tower."""

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads or self.heads
        head_dim = h // self.heads
        attention = h * h * 2 + 2 * h * kv * head_dim + 2 * h + 2 * kv * head_dim  # q, o, k, v (+ biases)
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return attention + mlp + 4 * h  # norms

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params() + embeddings + self.patch_params + 2 * self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        h, kv = self.hidden, self.kv_heads or self.heads
        kv_dim = kv * (h // self.heads)
        sizes = {
            "q_proj": (h, h),
            "k_proj": (h, kv_dim),
            "v_proj": (h, kv_dim),
            "o_proj": (h, h),
            "gate_proj": (h, self.intermediate),
            "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }
        return self.layers * sum(r * (sizes[t][0] + sizes[t][1]) for t in targets if t in sizes)

    def activation_bytes(self, tokens: int, batch: int, checkpointing: bool, flash: bool) -> float:
        """Activations kept for the backward of the whole stack, 16-bit."""
        s, b, h, a = tokens, batch, self.hidden, self.heads
        per_layer = s * b * h * 34 + (0 if flash else 5 * a * s * s * b)
        if checkpointing:
            return self.layers * 2 * s * b * h + per_layer
        return self.layers * per_layer


@dataclass(frozen=True)
class ModelShape:
    """A MEGL model: classifier + CLIP tower + projector + LM, and what trains."""

    name: str
    classifier_params: int
    classifier_act_bytes: float
    """Activations per image of the classifier at its input size, fp32 without checkpointing (measured shapes of
    torchvision's ResNets: ~100 MB per 224² image for ResNet-50)."""
    vision: TransformerShape
    lm: TransformerShape
    image_tokens: int
    text_tokens: int
    rationale_tokens: int
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    freeze_vision: bool = True
    freeze_lm: bool = False

    def projector_params(self) -> int:
        v, h = self.vision.hidden, self.lm.hidden
        return v * h + h * h + 2 * h

    def fusion_params(self, classifier_channels: int = 2048) -> int:
        return classifier_channels * self.lm.hidden + self.lm.hidden

    def trainable_frozen(self) -> tuple[int, int]:
        trainable = self.classifier_params + self.projector_params() + self.fusion_params()
        frozen = 0
        if self.freeze_vision:
            frozen += self.vision.params()
        else:
            trainable += self.vision.params()
        if self.lora_r > 0 or self.freeze_lm:
            frozen += self.lm.params()
            trainable += self.lm.lora_params(self.lora_r, self.lora_targets) if self.lora_r else 0
        else:
            trainable += self.lm.params()
        return trainable, frozen


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


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    host_offload: float = 0.0
    """Bytes held in host memory per worker (offloaded optimizer/parameters)."""
    trainable_params: int = 0
    frozen_params: int = 0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 2) for k, v in asdict(self).items() if isinstance(v, float)}
        out["total"] = round(self.total / GIB, 2)
        out["trainable_params"], out["frozen_params"] = self.trainable_params, self.frozen_params
        return out


def model_states(trainable: int, frozen: int, setup: Setup) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) in bytes per worker for these parameter counts, partitioned as
    ``setup``'s ZeRO stage does (ZeRO-3's gathered working layers and offload not included)."""
    if setup.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {setup.zero_stage}")
    world = max(1, setup.world)
    half = setup.precision in ("bf16", "fp16")
    param_bytes = 4.0 * trainable + (2.0 if half else 4.0) * frozen
    params = param_bytes / world if setup.zero_stage == 3 else param_bytes
    grads = 4.0 * trainable / (world if setup.zero_stage >= 2 else 1)
    optimizer = (12.0 * trainable / world) if setup.zero_stage >= 1 else 8.0 * trainable
    return params, grads, optimizer


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
    if setup.zero_stage == 3:
        params += 2.0 * max(model.lm.layer_params(), model.vision.layer_params()) * 2  # gathered + prefetched layer
    b = setup.micro_batch
    flash = setup.attn in ("sdpa", "flash_attention_2")
    ckpt = setup.gradient_checkpointing
    act_scale = 1.0 if half else 2.0  # the transformer formula is for 16-bit activations; fp32 doubles it
    seq = model.image_tokens + model.text_tokens
    activations = (
        model.lm.activation_bytes(seq, b, ckpt, flash)
        + model.vision.activation_bytes(model.image_tokens + 1, b, ckpt, flash)
    ) * act_scale
    classifier_act = model.classifier_act_bytes * b * (0.5 if half else 1.0)
    activations += classifier_act * (0.25 if ckpt else 1.0)  # per-stage checkpoints keep the stage inputs
    positions = model.rationale_tokens if setup.rationale_only_logits else seq
    logits = b * positions * model.lm.vocab * (4.0 + 4.0 + (2.0 if half else 0.0))  # fp32 logits + their grad
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        overhead=setup.overhead_gib * GIB,
        host_offload=host,
        trainable_params=trainable,
        frozen_params=frozen,
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
