"""Local base checkpoints for tests of the real-preset path (``clip-qwen2``): a small CLIP vision tower and a small
Qwen2 causal LM with a tokenizer, random init, saved with ``save_pretrained`` — no downloads."""

from pathlib import Path

import torch


def make_clip_qwen2_base(root: Path, corpus: list[str], hidden: int = 64, layers: int = 2) -> tuple[str, str]:
    """(vision_path, lm_path) directories under ``root``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    from megl_ray.model.vlm import train_tokenizer

    torch.manual_seed(1)
    tokenizer = train_tokenizer(corpus, 256)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vision_dir, lm_dir = root / "clip", root / "qwen2"
    vision.save_pretrained(str(vision_dir))
    lm.save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    return str(vision_dir), str(lm_dir)


def make_midsize_llava(root: Path, corpus: list[str]) -> tuple[Path, int]:
    """(directory, parameter count) of a LLaVA-1.5-layout base at reduced size, saved in bf16 as llava-1.5-7b-hf
    ships: Llama LM (hidden 1024, 8 layers, 16 heads, LLaVA-1.5's 32,064-token vocabulary), a 2-layer CLIP tower,
    feature layer -2 — ~169 M parameters, ~339 MB in bf16: large enough that a host copy of it stands out above
    the ~0.8 GB a Python with torch and transformers already holds."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from megl_ray.data.transforms import IMAGE_TOKEN
    from megl_ray.model.vlm import train_tokenizer

    tokenizer = train_tokenizer(corpus, 300)
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
        projection_dim=256,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=8,
        num_attention_heads=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():  # its values do not matter here; filling 169 M of them costs seconds
            model = LlavaForConditionalGeneration(config)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
    finally:
        torch.set_default_dtype(default)
    folder = root / "llava-midsize"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, sum(p.numel() for p in model.parameters())
