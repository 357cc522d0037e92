"""The one typed configuration of megl_ray: dataclasses, loaded from YAML with ``key=value`` overrides.

Every section is a dataclass whose fields carry docstrings (as comments) and whose ``__post_init__`` validates its
values, so a bad value fails at load time with the key named, not deep inside a training run. The resolved config is
saved inside every checkpoint (``to_dict``) and is what a sweep's best trial writes back as YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megl_ray.config.build import build_dataclass, deep_copy, parse_override, set_path
from megl_ray.config.build import check_value as _check
from megl_ray.config.packaged import config_path
from megl_ray.config.strict_yaml import load_yaml_file
from megl_ray.config.training_sections import OptimConfig, RunConfig, TrainConfig
from megl_ray.errors import ConfigError

ClassifierName = Literal["tiny", "resnet18", "resnet50", "vit_b_16"]
VLMPreset = Literal["tiny", "llava", "clip-qwen2"]
VisualTransform = Literal["none", "gradia", "haics", "gaussian", "margin"]


@dataclass
class ModelConfig:
    """The MEGL model: classifier f, its saliency Â, and the SDTG vision-language model."""

    classifier: ClassifierName = "tiny"
    """Classifier backbone: ``tiny`` (a small CNN for CPU tests), ``resnet18``, ``resnet50`` or ``vit_b_16``."""
    classifier_weights: str | None = None
    """Initial classifier weights: None (random), a torchvision weights name (e.g. ``IMAGENET1K_V1``, downloaded by
    torchvision where there is internet), or a local/``s3://`` state-dict file (.pt or .safetensors)."""
    classifier_head: Literal["linear", "mlp"] = "linear"
    """``linear`` (global-average-pool + linear: Grad-CAM has a closed form) or ``mlp`` (needs the autograd path)."""
    vit_pool: Literal["mean", "cls"] = "mean"
    """ViT pooling for the new head: ``mean`` of patch tokens (closed-form CAM) or the ``cls`` token (autograd)."""
    image_size: int = 64
    """Side of the square image the classifier sees (224 for the torchvision backbones). Images are decoded once at
    the larger of this and the vision tower's side (336 for CLIP-L/336) and resized down per consumer, so neither
    the classifier nor the VLM reads an upsampled image."""
    image_aspect: Literal["squash", "pad"] = "squash"
    """How a non-square image becomes square: ``squash`` (resized, aspect ratio lost) or ``pad`` (LLaVA-1.5's
    expand2square: centred on a square of the CLIP mean colour, then resized; ground-truth masks are padded alike.
    The dataset's prior Ā stays the one converted in the squashed frame)."""
    cam_target: Literal["label", "prediction"] = "label"
    """Class whose saliency is supervised during training: the ground-truth label (as in explanation supervision)
    or the predicted class. At inference the prediction is always used."""

    preset: VLMPreset = "tiny"
    """Vision-language model: ``tiny`` (random init from config, tokenizer trained on the rationales), ``llava``
    (a ``llava-1.5-7b-hf``-layout directory at ``vlm_path``) or ``clip-qwen2`` (CLIP at ``vision_path`` and a Qwen2
    causal LM at ``lm_path``, assembled into LLaVA)."""
    vlm_path: str | None = None
    """Local or ``s3://`` directory of a LLaVA checkpoint (preset ``llava``)."""
    vision_path: str | None = None
    """Local or ``s3://`` directory of a CLIP vision checkpoint (preset ``clip-qwen2``)."""
    lm_path: str | None = None
    """Local or ``s3://`` directory of a Qwen2 causal-LM checkpoint and its tokenizer (preset ``clip-qwen2``)."""
    tokenizer_path: str | None = None
    """Tokenizer directory for the tiny preset; None trains one on the dataset's rationales."""
    tiny_hidden_size: int = 64
    """Hidden size of the tiny preset's CLIP tower and Qwen2 LM."""
    tiny_vocab_size: int = 512
    """Vocabulary size of the tokenizer trained for the tiny preset."""
    tiny_layers: int = 2
    """Layers of the tiny preset's CLIP tower and of its Qwen2 LM (the mid-size test uses 12)."""
    tiny_vision_image_size: int = 32
    """Image side of the tiny CLIP tower (its patch size is 8, so 16 image tokens)."""

    sdtg: bool = True
    """Saliency-Driven Textual Grounding: image tokens are W_A·CLIP(I ⊙ Â) + W_I·Z_I. False gives the plain-LLaVA
    baseline of the paper: the VLM sees the plain image and no classifier features."""
    detach_classifier_features: bool = False
    """Stop gradients through Z_I, so the text loss reaches the classifier through Â alone (used by tests)."""
    freeze_vision: bool = True
    """Freeze the CLIP vision tower, as in the paper."""
    freeze_lm: bool = False
    """Freeze the language model's own weights (the projectors still train). LoRA adapters, if any, still train."""
    lora_r: int = 0
    """LoRA rank for the language model (0 = no LoRA, full fine-tuning unless ``freeze_lm``)."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the LM's linear modules that get LoRA adapters."""
    prompt_template: str = "USER: <image>\nWhy is this image a {label}? ASSISTANT:"
    """Prompt before the rationale; ``<image>`` is where the image tokens go, ``{label}`` the class name. A template
    without ``{label}`` is the label-free mode (e.g. ``USER: <image>\nWhat digit is this, and why? ASSISTANT:``): the
    VLM is not told the class, so a rationale that names it must be read from I ⊙ Â and Z_I, and L_text then has a
    reason to shape Â (with ``{label}`` a templated rationale is predictable from the prompt alone)."""
    max_text_tokens: int = 48
    """Maximum number of rationale tokens (prompt and image tokens not counted)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (non-reentrant): the LM's and the vision tower's layers and the
    classifier backbone's stages. Trades ~30% more compute for activation memory (see training/memory_model.py)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of the VLM: ``sdpa`` (PyTorch's fused kernels), ``eager`` or ``flash_attention_2`` (needs
    the flash-attn package and a GPU)."""
    freeze_norm: bool | None = None
    """BatchNorm layers of the classifier in eval mode with frozen affine parameters (at 4 images per GPU batch
    statistics are noise). None: on for pretrained ResNets (``classifier_weights`` set), off otherwise."""
    sync_bn: bool = False
    """Convert the classifier's BatchNorm to SyncBatchNorm (statistics over all workers' images; GPUs only)."""

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "model.image_size", f"must be >= 16, got {self.image_size}")
        _check(self.max_text_tokens >= 4, "model.max_text_tokens", f"must be >= 4, got {self.max_text_tokens}")
        _check(self.lora_r >= 0, "model.lora_r", f"must be >= 0, got {self.lora_r}")
        _check(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _check(
            self.tiny_hidden_size >= 8 and self.tiny_hidden_size % 8 == 0,
            "model.tiny_hidden_size",
            f"must be a positive multiple of 8 (4 attention heads of an even size), got {self.tiny_hidden_size}",
        )
        _check(self.tiny_vocab_size >= 64, "model.tiny_vocab_size", f"must be >= 64, got {self.tiny_vocab_size}")
        _check(self.tiny_layers >= 1, "model.tiny_layers", f"must be >= 1, got {self.tiny_layers}")
        _check(self.tiny_vision_image_size % 8 == 0, "model.tiny_vision_image_size", "must be a multiple of 8")
        _check("<image>" in self.prompt_template, "model.prompt_template", "must contain '<image>'")
        if self.preset == "llava":
            _check(bool(self.vlm_path), "model.vlm_path", "is required with model.preset=llava")
        if self.preset == "clip-qwen2":
            _check(bool(self.vision_path), "model.vision_path", "is required with model.preset=clip-qwen2")
            _check(bool(self.lm_path), "model.lm_path", "is required with model.preset=clip-qwen2")
        _check(
            not (self.sync_bn and self.freeze_norm),
            "model.sync_bn",
            "cannot be combined with model.freeze_norm=true (frozen BatchNorm keeps no batch statistics)",
        )
        if self.classifier == "vit_b_16":
            _check(self.image_size % 16 == 0, "model.image_size", "must be a multiple of 16 for vit_b_16")


@dataclass
class LossConfig:
    """Weights of the MEGL objective ``CE + text·L_text + visual·[I_V·L_visual + (1 − I_V)·dc·L_dc]``."""

    text_weight: float = 1.0
    """λ_text: weight of the causal-LM loss of the reference rationale."""
    visual_weight: float = 1.0
    """λ_vis: weight of the visual-explanation terms."""
    dc_weight: float = 0.1
    """λ_dc: weight of the distribution-consistency KL(Â‖Ā) for samples without a ground-truth map."""
    visual_ramp_start: float = 0.0
    """Fraction of the planned optimizer steps before which λ_vis (and with it λ_vis·λ_dc) is 0."""
    visual_ramp_end: float = 0.0
    """Fraction of the planned steps at which λ_vis reaches ``visual_weight``, linearly from ``visual_ramp_start``
    (0 and 0: constant from the first step, as in the paper). A strong visual term from the first step, before the
    classifier's features tell the classes apart, pulls every class's CAM onto the same ink blob: on the bundled
    digits λ_vis = 10 from step 0 ended at 0.36 test accuracy, ramped in over 30-60 % of the run at 0.95."""
    visual_transform: VisualTransform = "none"
    """Transform of the ground-truth map before the L1 term: ``none``, ``gradia``, ``haics``, ``gaussian`` or
    ``margin`` (only what mIoU reads: Â ≥ 0.6 inside the region, ≤ 0.4 outside; see ``losses.visual_loss``)."""
    gaussian_sigma: float = 1.0
    """Sigma, in saliency-grid cells, of the ``gaussian`` transform."""
    kl_eps: float = 1e-6
    """Smoothing added to both maps before they are normalised to distributions for the KL term."""
    rrr_weight: float = 0.0
    """λ_rrr, an option beyond the paper (0 = off, the paper's objective): the "Right for the Right Reasons"
    input-gradient penalty (Ross et al., IJCAI 2017) on samples with a ground-truth map: the squared gradient of the
    summed log-probabilities with respect to the input pixels outside the map. It constrains what the prediction
    uses, not only where the last-stage CAM points, so it removes a shortcut (see bench/ablation.py). Needs a
    double backward: not available with train.zero_stage=3."""

    counterfactual_weight: float = 0.0
    """λ_cf, an option beyond the paper (0 = off): counterfactual-background consistency. A training image's
    explained region (its ground-truth map, dilated; see ``counterfactual_regions`` for the others) is pasted onto
    another trusted image's background — that image's object blanked, its background (and any shortcut in it) kept —
    and the classifier must still predict the original label: CE(f(I_cf), y). A shortcut outside the explanation
    then predicts the wrong class on every counterfactual, so the annotated evidence decides what the prediction may
    use. After Chang et al., *Towards Robust Classification Model by Counterfactual and Invariant Data Generation*,
    CVPR 2021, and Xiao et al., *Noise or Signal: The Role of Image Backgrounds in Object Recognition*, ICLR 2021.
    One more classifier forward per step (shared with ``background_weight``); no double backward, so it works under
    ZeRO-3. Measured in bench/results/shortcut/."""
    background_weight: float = 0.0
    """λ_bg, an option beyond the paper (0 = off): the same trusted images with their explained region blanked (the
    mean colour of the rest) must predict nothing: KL(uniform ‖ f(I_bg)). Whatever the background alone makes the
    classifier say — a shortcut — is pushed to say nothing (Xiao et al.'s "Only-BG" images, as a loss)."""
    counterfactual_regions: Literal["prior", "masks", "saliency"] = "prior"
    """The explained region of a sample for ``counterfactual_weight`` and ``background_weight``: its ground-truth
    map where it has one; for the others ``prior`` takes the support of the evidence prior Ā (where annotated
    evidence occurs at all: what lies where no annotator ever marked evidence is background), ``masks`` leaves
    them out (only annotated samples get the terms) and ``saliency`` takes their own Â ≥ 0.5 (early in training Â
    sits on whatever CE found first — a shortcut — and the counterfactual then rewards it; kept to reproduce
    bench/results/shortcut/)."""

    def __post_init__(self) -> None:
        for name in (
            "text_weight",
            "visual_weight",
            "dc_weight",
            "rrr_weight",
            "counterfactual_weight",
            "background_weight",
        ):
            value = getattr(self, name)
            _check(value >= 0, f"loss.{name}", f"must be >= 0, got {value}")
        _check(
            0 <= self.visual_ramp_start <= self.visual_ramp_end <= 1,
            "loss.visual_ramp_start/end",
            f"need 0 <= start <= end <= 1, got {self.visual_ramp_start} and {self.visual_ramp_end}",
        )
        _check(self.gaussian_sigma > 0, "loss.gaussian_sigma", f"must be > 0, got {self.gaussian_sigma}")
        _check(0 < self.kl_eps < 1, "loss.kl_eps", f"must be in (0, 1), got {self.kl_eps}")


@dataclass
class DataConfig:
    """Where the converted dataset lives and how batches are made."""

    uri: str | None = None
    """Converted dataset (local directory or ``s3://bucket/prefix``); None uses the bundled sample dataset."""
    batch_size: int = 16
    """Micro-batch size per worker."""
    rationale_seed: int = 0
    """Seed of the per-epoch choice of one rationale per image."""
    max_rationales: int = 4
    """Rationales per image kept (tokenised once; one is drawn per image per epoch)."""
    shuffle_buffer: int = 256
    """Rows in each worker's seeded local shuffle buffer (reseeded every epoch)."""
    val_fraction: float = 0.1
    """For a dataset without a val split: fraction of each class of train carved out (seeded by train.seed) to
    validate on every epoch; 0 trains without per-epoch validation. Ignored when the dataset has a val split."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_rationales >= 1, "data.max_rationales", f"must be >= 1, got {self.max_rationales}")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")


@dataclass
class MEGLConfig:
    """The whole configuration: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Checked here, at load time, not after the workers start: ZeRO-3 gathers a module's weights only inside
        # its own forward, so a second backward through the graph of the first fails in DeepSpeed.
        _check(
            not (self.loss.rrr_weight > 0 and self.train.zero_stage == 3),
            "loss.rrr_weight",
            "the input-gradient penalty needs a double backward, which DeepSpeed ZeRO-3 does not support; "
            "use train.zero_stage=2 (or loss.rrr_weight=0)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_order(self) -> Literal["max", "min"]:
        """``run.checkpoint_mode``, inferred when unset: a loss term is better lower, a validation metric higher."""
        if self.run.checkpoint_mode is not None:
            return self.run.checkpoint_mode
        return "max" if (self.run.checkpoint_metric or "").startswith("val_") else "min"

    def to_yaml(self) -> str:  # the form a checkpoint, an export and a sweep's best_config.yaml hold
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Building dataclasses from plain dicts (types checked, keys named) lives in build.py.


def config_from_dict(data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> MEGLConfig:
    """Build a validated ``MEGLConfig`` from a nested dict plus ``key=value`` overrides (values parsed as YAML)."""
    tree = deep_copy(data or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(tree).__name__}")
    for text in overrides:
        path, value = parse_override(text)
        set_path(tree, path, value)
    return build_dataclass(MEGLConfig, tree, "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> MEGLConfig:
    """Load a YAML config file or packaged preset by name (or the defaults when ``path`` is None) and apply
    ``key=value`` overrides."""
    data = load_yaml_file(config_path(path), "config file") if path is not None else None
    return config_from_dict(data or {}, overrides)
