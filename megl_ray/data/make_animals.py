"""Build a second benchmark in the MEGL source layout from the animal silhouettes of the ``animal-mnist`` package.

    python -m megl_ray.data.make_animals OUT [--train-per-class 60] [--val-per-class 10] [--test-per-class 30]
        [--shortcut] [--part main|pretrain] [--seed 0] [--overwrite]

Each 64x64 RGB PNG is one of the package's 28x28 animal silhouettes (bear, bird, cat, cow, dog, elephant, giraffe,
horse, sheep, zebra), scaled 1.3-1.7x, filled with a dark colour and placed at random on a two-colour diagonal
gradient. About 10 % of the train/val images (and every test image) get a mask: the silhouette grown by
``MASK_MARGIN`` px. Rationales quote the animal's measured position, size, orientation and colour with per-class
shape wording. Every record carries its ``split``.

``--shortcut`` adds a 3 px frame around the image whose colour encodes the label in train and val and is random in
test: a shortcut of another kind than ``make_sample --shortcut``'s dark square (a colour at the periphery, not a
shape at a place), on other base images. ``--part pretrain`` draws from a disjoint half of the silhouettes (the
last 500 of each class; ``main`` uses the first 500), for a classifier pretrained on images no run is scored on.

The package ships the silhouettes as pickled numpy arrays; they are read with an unpickler that rebuilds numpy
arrays and nothing else. Install it without its (tensorflow) dependencies: ``pip install --no-deps animal-mnist``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from megl_ray.cli import ArgumentParser, options_from, run_cli, setup_logging
from megl_ray.data.generated import png_bytes, prepare_folder, write_layout
from megl_ray.errors import UserError

CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SIZE = 64
MASK_FRACTION = 0.1
MASK_MARGIN = 3
FRAME = 3
"""Width in px of the shortcut frame; animals and their masks stay inside it."""
FRAME_COLOURS = (  # one per class, far apart in hue and all unlike the dark fills
    (230, 60, 60), (60, 200, 60), (60, 90, 230), (240, 220, 40), (230, 60, 230),
    (40, 220, 230), (250, 150, 30), (150, 90, 250), (140, 250, 170), (250, 170, 200),
)  # fmt: skip
FILLS = {
    "black": (25, 25, 25),
    "navy": (25, 35, 95),
    "maroon": (95, 25, 30),
    "forest green": (25, 75, 35),
    "dark grey": (70, 70, 75),
    "brown": (90, 55, 25),
}
SHAPES = {
    "bear": ("a heavy body on short thick legs", "a rounded back and a small head held low"),
    "bird": ("a small body with a pointed beak", "wings and a thin tail instead of four legs"),
    "cat": ("a small body with pointed ears", "a long curved tail and a compact frame"),
    "cow": ("a long rectangular body on four straight legs", "a boxy torso with a short neck"),
    "dog": ("a lean body with a raised snout", "four legs, a short tail and alert ears"),
    "elephant": ("a large body with a hanging trunk", "thick pillar legs under a massive frame"),
    "giraffe": ("a very long neck rising above the body", "long thin legs and a tall, narrow outline"),
    "horse": ("a long neck and a flowing tail", "slim legs under a sleek, deep chest"),
    "sheep": ("a round woolly body on thin legs", "a bulky fleece with a small head in front"),
    "zebra": ("a horse-like body broken up by stripes", "striped flanks on four slender legs"),
}
TEMPLATES = (
    "The {fill} silhouette in the {position} shows {shape0}, so it is a {name}.",
    "A {size} animal {facing}: {shape1}, which marks a {name}.",
    "Look at the outline in the {position}: {shape0}; that is how a {name} looks.",
    "It is a {size} {fill} shape with {shape1}, a {name}.",
)
PER_CLASS_PART = 500


class _NumpyOnly(pickle.Unpickler):
    """Rebuilds numpy arrays and their dtypes; refuses every other global (a pickle can run any code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        # numpy 2 moved numpy.core to numpy._core (the pickles name the old path)
        core = np._core if hasattr(np, "_core") else np.core
        return getattr(core.multiarray if name == "_reconstruct" else np, name)


@functools.lru_cache(maxsize=1)
def silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """The package's 10,000 silhouettes, uint8 (10000, 28, 28), and their labels (0-9, ``CLASS_NAMES`` order)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("make_animals needs the animal-mnist package: pip install --no-deps animal-mnist==0.4")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / name, "rb") as f:
            arrays.append(np.asarray(_NumpyOnly(f).load()))
    images, labels = arrays
    return images.astype(np.uint8), labels.astype(np.int64)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A light diagonal gradient between two random pale colours, int32 (SIZE, SIZE, 3)."""
    a, b = rng.integers(170, 245, size=3), rng.integers(170, 245, size=3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy - min(0, np.cos(angle))) / (abs(np.cos(angle)) + np.sin(angle))
    return (a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]).astype(np.int32)


def _alpha(silhouette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The silhouette scaled 1.3-1.7x, maybe mirrored, at a random spot inside the frame and the mask margin."""
    side = int(round(28 * rng.uniform(1.3, 1.7)))
    image = Image.fromarray(silhouette).resize((side, side), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lo, hi = FRAME + MASK_MARGIN, SIZE - FRAME - MASK_MARGIN - side
    top, left = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    alpha = np.zeros((SIZE, SIZE), dtype=np.uint8)
    alpha[top : top + side, left : left + side] = np.asarray(image)
    return alpha


def _describe(alpha: np.ndarray, fill: str) -> dict[str, str]:
    rows, cols = np.nonzero(alpha > 100)
    cy, cx = rows.mean() / SIZE, cols.mean() / SIZE
    vertical = "upper" if cy < 0.42 else "lower" if cy > 0.58 else "middle"
    horizontal = "left" if cx < 0.42 else "right" if cx > 0.58 else "centre"
    position = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    area = (alpha > 100).mean()
    size = "small" if area < 0.12 else "large" if area > 0.2 else "medium-sized"
    width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    facing = "standing wider than tall" if width > 1.15 * height else "taller than wide"
    return {"position": position, "size": size, "facing": facing, "fill": fill}


def render(silhouette: np.ndarray, rng: np.random.Generator, frame: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """One image: (rgb uint8, silhouette alpha uint8, fill name); ``frame`` the frame's colour index or None."""
    background = _background(rng)
    fill = list(FILLS)[int(rng.integers(len(FILLS)))]
    alpha = _alpha(silhouette, rng)
    a = alpha.astype(np.int32)[:, :, None]
    ink = np.array(FILLS[fill], dtype=np.int32)[None, None, :]
    rgb = ((background * (255 - a) + ink * a + 127) // 255).astype(np.uint8)
    if frame is not None:
        colour = np.array(FRAME_COLOURS[frame], dtype=np.uint8)
        rgb[:FRAME], rgb[-FRAME:], rgb[:, :FRAME], rgb[:, -FRAME:] = colour, colour, colour, colour
    return rgb, alpha, fill


def evidence_region(alpha: np.ndarray) -> np.ndarray:
    grown = Image.fromarray(alpha).filter(ImageFilter.MaxFilter(2 * MASK_MARGIN + 1))
    return np.asarray(grown, dtype=np.float32) / np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class AnimalOptions:
    """What to generate (the options of ``python -m megl_ray.data.make_animals``)."""

    out: str
    """Folder to write (created; must be empty unless ``overwrite``)."""
    train_per_class: int = 60
    val_per_class: int = 10
    test_per_class: int = 30
    shortcut: bool = False
    """Add a label-coloured frame in train/val and a random-coloured one in test."""
    part: str = "main"
    """``main`` (the first 500 silhouettes of each class) or ``pretrain`` (the last 500: disjoint)."""
    seed: int = 0
    overwrite: bool = False


def build(args: AnimalOptions) -> dict[str, Any]:
    """Write the folder; return a summary dict."""
    counts = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
    if min(counts.values()) < 0 or args.train_per_class < 1 or sum(counts.values()) > PER_CLASS_PART:
        raise UserError(f"per-class counts must be >= 0 (train >= 1) and add up to at most {PER_CLASS_PART}")
    if args.part not in ("main", "pretrain"):
        raise UserError(f"--part must be main or pretrain, got {args.part}")
    images, labels = silhouettes()
    prepare_folder(args.out, args.overwrite)
    rng = np.random.default_rng(args.seed)
    items = []  # (class, silhouette row, split, has mask)
    for c in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(labels == c)
        part = rows[:PER_CLASS_PART] if args.part == "main" else rows[PER_CLASS_PART : 2 * PER_CLASS_PART]
        chosen = iter(rng.choice(part, size=sum(counts.values()), replace=False).tolist())
        for split, n in counts.items():
            masked = set(rng.choice(n, size=int(round(n * MASK_FRACTION)), replace=False).tolist())
            items += [(c, next(chosen), split, split == "test" or k in masked) for k in range(n)]
    items = [items[i] for i in rng.permutation(len(items))]  # ids say nothing about labels
    annotations: dict[str, dict[str, Any]] = {}
    for number, (class_id, row, split, has_mask) in enumerate(items):
        record_id = f"{number:05d}"
        frame = None
        if args.shortcut:
            frame = int(rng.integers(len(CLASS_NAMES))) if split == "test" else class_id
        rgb, alpha, fill = render(images[row], rng, frame)
        with open(os.path.join(args.out, "images", f"{record_id}.png"), "wb") as f:
            f.write(png_bytes(rgb))
        name = CLASS_NAMES[class_id]
        evidence = _describe(alpha, fill)
        shapes = SHAPES[name]
        picked = rng.choice(len(TEMPLATES), size=int(rng.integers(2, 4)), replace=False)
        mask_path = f"masks/{record_id}.npy" if has_mask else ""
        if has_mask:
            np.save(os.path.join(args.out, mask_path), evidence_region(alpha))
        annotations[record_id] = {
            "image_path": f"images/{record_id}.png",
            "class_id": class_id,
            "visual_exp": mask_path,
            "exp": [TEMPLATES[t].format(name=name, shape0=shapes[0], shape1=shapes[1], **evidence) for t in picked],
            "ans": name,
            "split": split,
        }
    write_layout(args.out, annotations, CLASS_NAMES, _readme(args, len(items)))
    masks = sum(1 for item in items if item[3])
    return {"out": args.out, "images": len(items), "with_mask": masks, "shortcut": args.shortcut, "part": args.part}


def _readme(args: AnimalOptions, n_images: int) -> str:
    flags = (
        f"--train-per-class {args.train_per_class} --val-per-class {args.val_per_class} "
        f"--test-per-class {args.test_per_class} --part {args.part} --seed {args.seed}"
        + (" --shortcut" if args.shortcut else "")
    )
    return f"""# MEGL animals benchmark

{n_images} animal silhouettes ({len(CLASS_NAMES)} classes) in the MEGL source layout, made by

    python -m megl_ray.data.make_animals OUT {flags}

Source: the `animal-mnist` package (Sina Mohammadi, MIT licence), 28x28 silhouettes, drawn here as 64x64 RGB
images on light gradients. Masks (`masks/*.npy`): the silhouette grown by {MASK_MARGIN} px, on 10 % of train/val
and on every test image. {
        "A label-coloured 3 px frame in train/val, a random-coloured one in test."
        if args.shortcut
        else "No planted shortcut."
    }
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.data.make_animals", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--train-per-class", type=int, default=60, help="train images per class (default 60)")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class (default 10)")
    p.add_argument("--test-per-class", type=int, default=30, help="test images per class (default 30)")
    p.add_argument("--shortcut", action="store_true", help="a label-coloured frame in train/val, random in test")
    p.add_argument("--part", default="main", choices=("main", "pretrain"), help="which half of the silhouettes")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace this command's files in a non-empty OUT")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return build(options_from(AnimalOptions, args))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("megl_ray.data.make_animals", main))
