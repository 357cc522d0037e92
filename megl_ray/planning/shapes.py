"""Architecture shapes for the memory and cost models: parameter counts, LoRA sizes and the activations a layer
saves for its backward under MEGL's precision setup. No Ray, no torch; the rules are explained in
``megl_ray.planning.memory_model`` and measured by ``bench/memory_model.py``."""

from __future__ import annotations

from dataclasses import dataclass


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

    def projection_inputs(self) -> dict[str, int]:
        """Input width of each projection LoRA can adapt."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h, "down_proj": i}

    def layer_activation_bytes(self, tokens: int, batch: int, acts: Acts) -> float:
        """Bytes one layer saves for its backward under 16-bit autocast with fp32 norms (module docstring)."""
        n, h, i = tokens * batch, self.hidden, self.intermediate
        kv = (self.kv_heads or self.heads) * (h // self.heads)

        # The residual stream is fp32 when the stack trains (an fp32 embedding table or position embedding feeds it)
        # and 16-bit otherwise. A linear saves its input only when its weight trains: autocast's 16-bit cast of it,
        # one per consumer of an fp32 stream (q, k, v cast it separately). ZeRO-3's linear saves the input as is.
        stream = 4 if acts.trains else 2

        def linear_input(width: int, consumers: int = 1, dtype_bytes: int = stream) -> int:
            if acts.zero3:
                return dtype_bytes * n * width
            if not acts.trains:
                return 0
            return 2 * n * width * (consumers if dtype_bytes == 4 else 1)

        norms = 2 * n * h * (8 if acts.trains else 4)  # fp32 input (+ fp32 normalised input for a trained weight)
        # q, k, v, the output and an fp32 logsumexp in the kernel (o_proj's input is a view of that output)
        attention = linear_input(h, 3) + n * (4 * h + 4 * kv) + 4 * batch * self.heads * tokens
        if not acts.flash:
            attention += 5 * self.heads * tokens * tokens * batch
        # SwiGLU: the activation's input and output and up_proj's output (the product's factors), the product as
        # down_proj's input; plain MLP: GELU's input, its output as fc2's input (both 16-bit)
        mlp = linear_input(h, 2 if self.gated_mlp else 1) + (6 if self.gated_mlp else 2) * n * i
        mlp += linear_input(i, 1, 2)
        adapters = 0
        for name, width in self.projection_inputs().items():
            if acts.lora.r and name in acts.lora.targets:
                mask = acts.mask_bytes * n * width if acts.lora.dropout > 0 else 0
                # peft's fp32 input: ZeRO-3's linear saves it as is, autocast's linear its 16-bit cast
                adapters += mask + (4 if acts.zero3 else 2) * n * width + 2 * n * acts.lora.r
        return norms + attention + mlp + adapters

    def activation_bytes(self, tokens: int, batch: int, checkpointing: bool, acts: Acts) -> float:
        """Activations kept for the backward of the whole stack: every layer's, or with checkpointing each layer's
        input (in the stream's dtype) plus one layer being recomputed; plus an LM's final norm and head input."""
        if not self.layers:
            return 0.0
        per_layer = self.layer_activation_bytes(tokens, batch, acts)
        n = tokens * batch
        head = 0
        if self.vocab:  # the final norm, and the LM head's input (ZeRO-3: the norm's output as it comes)
            head = n * self.hidden * (8 if acts.trains else 4)
            if acts.zero3:
                head += (4 if acts.trains else 2) * n * self.hidden
            elif acts.trains:
                head += 2 * n * self.hidden
        if checkpointing:  # each layer's input, in the stream's dtype
            return self.layers * (4 if acts.trains else 2) * n * self.hidden + per_layer + head
        return self.layers * per_layer + head


@dataclass(frozen=True)
class Lora:
    """An LM's adapters: rank, adapted projections, dropout (peft's ``LoraConfig``)."""

    r: int = 0
    targets: tuple[str, ...] = ()
    dropout: float = 0.0


NO_LORA = Lora()


@dataclass(frozen=True)
class Acts:
    """What decides a stack's saved activations (``memory_per_gpu`` fills it from the model and the setup)."""

    trains: bool = False
    """The stack's weights train (a linear then saves its input for the weight's gradient)."""
    zero3: bool = False
    """ZeRO-3: DeepSpeed's ``LinearFunctionForZeroStage3`` replaces ``F.linear`` and saves every input as given."""
    flash: bool = True
    mask_bytes: int = 1
    lora: Lora = NO_LORA


@dataclass(frozen=True)
class ModelShape:
    """A MEGL model: classifier + CLIP tower + projector + LM, and what trains. ``vision=None`` and no classifier
    give a bare LM (``bench/memory_model.py`` checks the model on one)."""

    name: str
    classifier_params: int
    classifier_act_bytes: float
    """Activations per image of the classifier at its input size, fp32 without checkpointing (measured shapes of
    torchvision's ResNets: ~100 MB per 224² image for ResNet-50)."""
    vision: TransformerShape | None
    lm: TransformerShape
    image_tokens: int
    text_tokens: int
    rationale_tokens: int
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    freeze_vision: bool = True
    freeze_lm: bool = False

    def projector_params(self) -> int:
        v, h = (self.vision.hidden if self.vision else 0), self.lm.hidden
        return v * h + h * h + 2 * h if self.vision else 0

    def fusion_params(self, classifier_channels: int = 2048) -> int:
        return classifier_channels * self.lm.hidden + self.lm.hidden if self.classifier_params else 0

    def lm_trains(self) -> bool:
        return not (self.lora_r > 0 or self.freeze_lm)

    def trainable_frozen(self) -> tuple[int, int]:
        trainable = self.classifier_params + self.projector_params() + self.fusion_params()
        frozen = 0
        vision = self.vision.params() if self.vision else 0
        if self.freeze_vision:
            frozen += vision
        else:
            trainable += vision
        if not self.lm_trains():
            frozen += self.lm.params()
            trainable += self.lm.lora_params(self.lora_r, self.lora_targets) if self.lora_r else 0
        else:
            trainable += self.lm.params()
        return trainable, frozen
