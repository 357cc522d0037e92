"""The models and batches ``bench/gpu_step.py`` measures: the shipped presets' configurations at their real shapes
(or tiny ones), random init from config, no downloads, and the memory model's description of each.

Imports torch, transformers, peft (through megl_ray.model) and megl_ray's config and model code: nothing of Ray,
pyarrow or boto3, so a GPU machine with torch, transformers and torchvision (plus the wheels in bench/README.md) can
run it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from megl_ray.config import MEGLConfig
from megl_ray.model import MEGLModel, build_megl_model
from megl_ray.model.precision import autocast_dtype
from megl_ray.model.vlm import VLMBundle, _num_image_tokens, apply_training_mode, set_memory_options, train_tokenizer
from megl_ray.planning import memory_model
from megl_ray.training.ds_config import resolve_precision

PROMPT_TOKENS = 12
"""Prompt text around the image tokens ("USER: <image> ... ASSISTANT:" is 10-15 tokens with LLaVA's tokenizer)."""

# Language models, as their Hugging Face configs give them. llama-7b is llava-1.5-7b-hf's text_config (Vicuna-7B,
# vocabulary 32,064 with the image and pad tokens); qwen2-0.5b is Qwen2-0.5B. The tiny shapes keep the architecture
# (Llama or Qwen2: LoRA finds the same q/k/v/o projections) at sizes a 2-core CPU steps in well under a second.
LM_SHAPES = {
    "llama-7b": dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "qwen2-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# CLIP ViT-L/14-336 (LLaVA-1.5's tower, read at its penultimate layer), and the tiny preset's 2-layer tower (read at
# its last: a 2-layer tower has no useful penultimate layer).
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
TINY_CLIP = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def vlm_bundle(model_cfg: Any, lm: str, tiny: bool, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A LLaVA at ``lm``'s shapes (CLIP-L/14-336 in front) with a BPE tokenizer, built directly on ``device`` in
    ``dtype`` (a 7B LM never exists in fp32 or on the host), then frozen/LoRA and memory options as ``model_cfg``
    says. Random init: the step costs the same whatever the weights."""
    words = [f"word{i} shape{i % 7} colour{i % 5}" for i in range(200)]
    tokenizer = train_tokenizer(words, 512)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    shape = {**LM_SHAPES[lm], **TINY_LM, "vocab_size": len(tokenizer)} if tiny else LM_SHAPES[lm]
    common = dict(max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
    text = (
        LlamaConfig(**shape, **common, rms_norm_eps=1e-5) if lm.startswith("llama") else Qwen2Config(**shape, **common)
    )
    vision = CLIPVisionConfig(**(TINY_CLIP if tiny else CLIP_L_336))
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_id,
        vision_feature_layer=-1 if tiny else -2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text.tie_word_embeddings,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # parameters allocated and initialised where they will train
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    bundle = VLMBundle(model, tokenizer, image_id, _num_image_tokens(config), config.vision_config.image_size)
    apply_training_mode(bundle, model_cfg)
    set_memory_options(bundle.model, model_cfg)
    return bundle


def build(lm: str, cfg: MEGLConfig, tiny: bool, device: str, seed: int = 0):
    """(model, batch): the MEGL model for ``cfg`` with the ``lm`` shapes (seeded), and one fixed random batch of the
    training layout (BOS + image tokens + prompt + rationale, LM labels on the rationale), on the host."""
    torch.manual_seed(seed)
    dtype = autocast_dtype(cfg.train.precision) or torch.float32
    vlm = vlm_bundle(cfg.model, lm, tiny, device, dtype)
    model = build_megl_model(cfg, 10, vlm=vlm)
    batch = make_batch(model, cfg.data.batch_size, cfg.model.max_text_tokens, seed)
    return model, batch


def make_batch(model: MEGLModel, batch: int, rationale_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.pixel_size  # what the data pipeline decodes at: CLIP-L/336's side, above ResNet's 224
    vocab = model.vlm.config.text_config.vocab_size
    prompt = [model.tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens
    text = torch.randint(10, vocab, (batch, PROMPT_TOKENS + rationale_tokens), generator=g)
    text[text == model.image_token_id] = 11
    ids = torch.cat([torch.tensor(prompt).expand(batch, -1), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -rationale_tokens:] = ids[:, -rationale_tokens:]
    masks = torch.zeros(batch, 64, 64)
    masks[:, 16:48, 16:48] = 1.0
    return {
        "pixels": torch.rand(batch, 3, size, size, generator=g),
        "labels": torch.arange(batch) % 10,
        "masks": masks,
        "has_mask": torch.arange(batch) % 2 == 0,  # half the batch annotated: both branches of the visual loss run
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "text_labels": labels,
        "sample_weight": torch.ones(batch),
    }


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters of the built model, to set beside the memory model's count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def predicted_memory(model: MEGLModel, cfg: MEGLConfig, batch: dict, use_gpu: bool) -> dict[str, Any]:
    """``memory_model.memory_per_gpu`` for this model and step, its shapes read off the built model: the per-GPU
    GiB it predicts (the components and the total). Another module owns the rules; this only describes the case."""
    vc, tc = model.vlm.config.vision_config, model.vlm.config.text_config
    layer = model.vlm.config.vision_feature_layer
    patches = (vc.image_size // vc.patch_size) ** 2
    vision = memory_model.TransformerShape(
        layers=vc.num_hidden_layers + 1 + layer if layer < 0 else layer,  # the layers that run up to the feature
        hidden=vc.hidden_size,
        intermediate=vc.intermediate_size,
        heads=vc.num_attention_heads,
        gated_mlp=False,
        patch_params=3 * vc.patch_size**2 * vc.hidden_size + (patches + 1) * vc.hidden_size,
    )
    lm = memory_model.TransformerShape(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        intermediate=tc.intermediate_size,
        heads=tc.num_attention_heads,
        kv_heads=tc.num_key_value_heads,
        vocab=tc.vocab_size,
        tied_embeddings=bool(model.vlm.config.tie_word_embeddings),
    )
    m = cfg.model
    # fp32 activations per image of torchvision's ResNets at 224² (the memory model's figures), by area
    per_image = {"resnet18": memory_model.RESNET18[1], "resnet50": memory_model.RESNET50[1]}.get(m.classifier, 0.0)
    seq, rationale = batch["input_ids"].shape[1], m.max_text_tokens
    shape = memory_model.ModelShape(
        name=f"{m.classifier}+{tc.model_type}",
        classifier_params=sum(p.numel() for p in model.classifier.parameters()),
        classifier_act_bytes=per_image * (m.image_size / 224) ** 2,
        vision=vision,
        lm=lm,
        image_tokens=model.num_image_tokens,
        text_tokens=seq - model.num_image_tokens,
        rationale_tokens=rationale,
        lora_r=m.lora_r,
        lora_targets=tuple(m.lora_target_modules),
        freeze_vision=m.freeze_vision,
        freeze_lm=m.freeze_lm,
    )
    setup = memory_model.Setup(
        world=1,
        zero_stage=cfg.train.zero_stage,
        precision=resolve_precision(cfg, use_gpu),
        micro_batch=batch["input_ids"].shape[0],
        gradient_checkpointing=m.gradient_checkpointing,
        offload=cfg.train.offload,
        attn=m.attn_implementation,
    )
    return memory_model.memory_per_gpu(shape, setup).gib()
