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
