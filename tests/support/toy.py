"""A toy MEGL batch for model tests: class k is a bright square in quadrant k, described by its own rationale."""

import numpy as np

from megl_ray.data.transforms import collate

CLASS_NAMES = ["top left", "top right", "bottom left", "bottom right"]
RATIONALES = [
    "a bright square sits in the top left corner of a dark field",
    "the bright square is placed at the top right near the edge",
    "there is a bright block low on the left side of the image",
    "a white patch fills the lower right part while the rest is dark",
]


def make_examples(n: int = 16, seed: int = 0, mask_every: int = 4):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        label = i % 4
        pixels = rng.uniform(0, 0.2, size=(3, 64, 64)).astype(np.float32)
        mask = np.zeros((64, 64), dtype=np.float32)
        r, c = (label // 2) * 32 + 8, (label % 2) * 32 + 8
        pixels[:, r : r + 16, c : c + 16] = rng.uniform(0.8, 1.0)
        mask[r : r + 16, c : c + 16] = 1.0
        has_mask = i % mask_every == 0
        examples.append(
            {
                "id": f"toy-{i}",
                "pixels": pixels,
                "label": label,
                "label_name": CLASS_NAMES[label],
                "mask": mask if has_mask else np.zeros_like(mask),
                "has_mask": has_mask,
                "rationale": RATIONALES[label],
            }
        )
    return examples


def corpus():
    return RATIONALES + CLASS_NAMES


def make_batch(model, cfg, n: int = 16, seed: int = 0, mask_every: int = 4):
    return collate(
        make_examples(n, seed, mask_every),
        model.tokenizer,
        cfg.model.prompt_template,
        model.num_image_tokens,
        cfg.model.max_text_tokens,
    )
