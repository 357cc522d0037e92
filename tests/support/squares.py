"""A synthetic dataset in the MEGL source layout whose ground truth is known exactly: each 64x64 image shows one bright
square on a grey noisy background; the square's colour is the class, its position is random, and every image has the
square as its mask. A model that explains correctly must put its saliency on the square.

(The class is a colour, not a position: a global-average-pooled CNN, like the tiny classifier, cannot tell absolute
positions apart.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["red", "green", "blue", "yellow"]
COLOURS = {"red": (0.95, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.2, 0.95), "yellow": (0.95, 0.9, 0.1)}
SIZE, SIDE = 64, 16


def _where(r: int, c: int) -> str:
    return f"{'upper' if r + SIDE / 2 < SIZE / 2 else 'lower'} {'left' if c + SIDE / 2 < SIZE / 2 else 'right'}"


def write_squares(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """Write ``per_class`` images per class with masks and two rationales each under ``root``; return ``root``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    annotations = {}
    for n in range(per_class * len(CLASSES)):
        label = n % len(CLASSES)
        name = CLASSES[label]
        r, c = (int(v) for v in rng.integers(0, SIZE - SIDE + 1, size=2))
        image = np.repeat(rng.uniform(0.3, 0.6, size=(SIZE, SIZE, 1)), 3, axis=2)  # grey: colour only in the square
        image[r : r + SIDE, c : c + SIDE] = COLOURS[name]
        mask = np.zeros((SIZE, SIZE), dtype=np.float32)
        mask[r : r + SIDE, c : c + SIDE] = 1.0
        key = f"{n:04d}"
        Image.fromarray(np.rint(image * 255).astype(np.uint8), "RGB").save(root / "images" / f"{key}.png")
        np.save(root / "masks" / f"{key}.npy", mask)
        annotations[key] = {
            "image_path": f"images/{key}.png",
            "class_id": label,
            "visual_exp": f"masks/{key}.npy",
            "ans": name,
            "exp": [f"A {name} square sits in the {_where(r, c)} part.", f"The only coloured patch is {name}."],
        }
    (root / "exp_annotation.json").write_text(json.dumps(annotations, indent=1))
    (root / "label_class_id_mapping.json").write_text(json.dumps({c: i for i, c in enumerate(CLASSES)}))
    return root
