"""The vision-language model of MEGL: transformers' ``LlavaForConditionalGeneration`` (CLIP tower + projector +
causal LM) and its tokenizer, from one of three presets. Nothing is fetched from a model hub: ``tiny`` is built from
config with random weights and a tokenizer trained on the corpus; ``llava`` and ``clip-qwen2`` load from local or
``s3://`` directories the user provides.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from megl_ray.config import ModelConfig
from megl_ray.data.prompt import IMAGE_TOKEN
from megl_ray.errors import ConfigError, UserError
from megl_ray.model import hub
from megl_ray.model.checkpoint_io import local_dir, read_uri_bytes
from megl_ray.model.classifier_weights import check_torchvision_weights

log = logging.getLogger(__name__)

# LLaVA-1.5 feeds CLIP-normalised pixels; the same constants serve the CLIP towers of all presets.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]


@dataclass
class VLMBundle:
    """A Llava model with its tokenizer and the facts the rest of MEGL needs about it."""

    model: Any  # transformers.LlavaForConditionalGeneration (possibly with LoRA layers injected)
    tokenizer: Any
    image_token_id: int
    num_image_tokens: int
    vision_image_size: int


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus`` with the ``tokenizers`` library (the tiny preset's)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def load_tokenizer(cfg: ModelConfig, corpus: Iterable[str] | None = None) -> Any:
    """The tokenizer the configured preset uses, without loading any weights (the driver prepares data with it)."""
    if cfg.preset == "tiny":
        if cfg.tokenizer_path:
            return AutoTokenizer.from_pretrained(str(local_dir(cfg.tokenizer_path, hub.TOKENIZER_FILES)))
        if corpus is None:
            raise ConfigError("model.tokenizer_path: the tiny preset needs a tokenizer or a corpus to train one on")
        return train_tokenizer(corpus, cfg.tiny_vocab_size)
    path = cfg.vlm_path if cfg.preset == "llava" else cfg.lm_path
    key = "model.vlm_path" if cfg.preset == "llava" else "model.lm_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir(path, hub.TOKENIZER_FILES)))
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vision_tower_image_size(cfg: ModelConfig) -> int:
    """The image side the configured preset's CLIP tower reads, from the config alone (tiny) or the checkpoint's
    ``config.json`` (one small file: the driver sizes the data without loading or downloading any weights)."""
    if cfg.preset == "tiny":
        return cfg.tiny_vision_image_size
    key, uri = ("model.vlm_path", cfg.vlm_path) if cfg.preset == "llava" else ("model.vision_path", cfg.vision_path)
    return _configured_image_size(key, str(uri))


@functools.lru_cache(maxsize=16)
def _configured_image_size(key: str, uri: str) -> int:
    if hub.is_hub_id(uri):  # the snapshot's config and tokenizer files only (the driver never fetches weights)
        uri = str(local_dir(uri, hub.TOKENIZER_FILES))
    path = uri.rstrip("/") + "/config.json"
    try:
        data = json.loads(read_uri_bytes(path if uri.startswith("s3://") else os.path.expanduser(path)))
        vision = data.get("vision_config", data)  # a LLaVA or full CLIP config nests it; CLIPVisionConfig does not
        return int(vision.get("image_size", 224))  # transformers' CLIPVisionConfig default
    except (UserError, ValueError, AttributeError, TypeError) as err:
        raise UserError(f"{key}: cannot read the vision tower's image size from {path}: {err}") from None


def check_model_sources(cfg: ModelConfig) -> None:
    """Fail now, in one line, on a model named by a hub id that cannot be resolved, or torchvision weights that
    cannot be had — before any data, storage or Ray is touched. Only config and tokenizer files are fetched here;
    the weights come where they are loaded (a torchvision enum's file, small, into the torch hub cache)."""
    check_torchvision_weights(cfg.classifier, cfg.classifier_weights)
    for key in ("vlm_path", "lm_path", "vision_path", "tokenizer_path"):
        value = getattr(cfg, key)
        if value and hub.is_hub_id(value):
            try:
                local_dir(value, hub.TOKENIZER_FILES)
            except UserError as err:
                raise UserError(f"model.{key}: {err}") from None


def pixel_size(cfg: ModelConfig) -> int:
    """The side images are decoded at: the larger of the classifier's and the vision tower's, so that each
    consumer only ever resizes down (a 224 decode upsampled to CLIP-L/336 would feed the VLM a blurred image)."""
    return max(cfg.image_size, vision_tower_image_size(cfg))


def tiny_llava_config(cfg: ModelConfig, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    hidden = cfg.tiny_hidden_size
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        image_size=cfg.tiny_vision_image_size,
        patch_size=8,
        projection_dim=hidden,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    # vision_feature_layer -1: a 2-layer tower has no useful penultimate layer (LLaVA's -2 is for 24 layers).
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _num_image_tokens(config: Any) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


def build_tiny(cfg: ModelConfig, corpus: Iterable[str] | None = None, tokenizer: Any = None) -> VLMBundle:
    """The tiny preset: random-init 2-layer CLIP + 2-layer Qwen2 and a BPE tokenizer trained on ``corpus``."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg, corpus)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_llava_config(cfg, len(tokenizer), image_token_id, tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config)
    return VLMBundle(model, tokenizer, image_token_id, _num_image_tokens(config), config.vision_config.image_size)


def load_llava(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> VLMBundle:
    """A ``llava-1.5-7b-hf``-layout directory (config.json, safetensors, tokenizer files), loaded directly in
    ``dtype`` (the training's 16-bit type for frozen weights: a 7B LM never exists in fp32 on the host)."""
    path = local_dir(cfg.vlm_path)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.vlm_path: cannot load a LLaVA checkpoint from {cfg.vlm_path}: {str(err).splitlines()[0]}"
        ) from None
    config = model.config
    return VLMBundle(
        model, tokenizer, config.image_token_id, _num_image_tokens(config), config.vision_config.image_size
    )


def assemble_clip_qwen2(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> VLMBundle:
    """LLaVA assembled from a CLIP vision checkpoint and a Qwen2 causal LM, with a new (trainable) projector;
    weights loaded and the shell built in ``dtype``."""
    vision_dir, lm_dir = local_dir(cfg.vision_path), local_dir(cfg.lm_path)
    try:
        vision = CLIPVisionModel.from_pretrained(str(vision_dir), dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.vision_path: cannot load CLIP from {cfg.vision_path}: {str(err).splitlines()[0]}"
        ) from None
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.lm_path: cannot load a causal LM from {cfg.lm_path}: {str(err).splitlines()[0]}"
        ) from None
    tokenizer = load_tokenizer(cfg)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return VLMBundle(model, tokenizer, image_token_id, _num_image_tokens(model.config), config.vision_config.image_size)


def apply_training_mode(bundle: VLMBundle, cfg: ModelConfig) -> None:
    """Freezing and LoRA as configured. Frozen towers still pass gradients to their *inputs* (I ⊙ Â)."""
    model = bundle.model
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    lm = model.model.language_model
    if cfg.freeze_lm or cfg.lora_r > 0:
        lm.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if cfg.lora_r > 0:
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            bias="none",
        )
        try:
            inject_adapter_in_model(lora, lm)
        except ValueError as err:
            raise ConfigError(f"model.lora_target_modules: {str(err).splitlines()[0]}") from None
        for name, param in lm.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)


def set_memory_options(model: Any, cfg: ModelConfig) -> None:
    """``model.attn_implementation`` and ``model.gradient_checkpointing`` (non-reentrant: works with frozen towers
    whose inputs need no grad, with LoRA and with ZeRO-3's parameter hooks)."""
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
            "installed (pip install flash-attn on a CUDA machine), or use sdpa"
        )
    if model.config._attn_implementation != cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"model.attn_implementation: {str(err).splitlines()[0]}") from None
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_vlm(
    cfg: ModelConfig, corpus: Iterable[str] | None = None, tokenizer: Any = None, dtype: torch.dtype = torch.float32
) -> VLMBundle:
    """The configured preset, with freezing/LoRA, attention kernel and checkpointing applied. Real presets load
    their weights in ``dtype``."""
    if cfg.preset == "tiny":
        bundle = build_tiny(cfg, corpus, tokenizer)
    elif cfg.preset == "llava":
        bundle = load_llava(cfg, dtype)
    elif cfg.preset == "clip-qwen2":
        bundle = assemble_clip_qwen2(cfg, dtype)
    else:
        raise ConfigError(f"model.preset: unknown preset '{cfg.preset}'")
    apply_training_mode(bundle, cfg)
    set_memory_options(bundle.model, cfg)
    return bundle


def language_hidden_size(model: nn.Module) -> int:
    return model.config.text_config.hidden_size
