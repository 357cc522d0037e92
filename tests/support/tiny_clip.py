"""A small real CLIP (transformers ``CLIPModel`` from a ``CLIPConfig``, random weights) with a BPE tokenizer and a
``CLIPImageProcessor``, saved as a checkpoint directory: what ``--clip-path`` reads, built in a second, offline."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "a red square on a grey background",
    "the bird has a long beak",
    "a small yellow patch",
    "wings are blue and the tail is short",
    "this is a photo of a dog",
]


def save_tiny_clip(root: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from megl_ray.model.vlm import train_tokenizer

    tokenizer = train_tokenizer(SENTENCES * 4, vocab_size=300)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(root))
    return root
