"""Writing a generated dataset in the MEGL authors' source layout (``make_sample``, ``make_animals``): the folder,
deterministic PNGs, the two JSON files and the README."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from megl_ray.errors import UserError

OWNED = ("images", "masks", "exp_annotation.json", "label_class_id_mapping.json", "README.md")
"""What a generator writes into its folder (and, with ``--overwrite``, replaces: nothing else in the folder)."""


def prepare_folder(out: str, overwrite: bool) -> None:
    """Make ``out`` ready for a generated dataset: new or empty, or (``overwrite``) with this layout's files
    removed; one-line errors otherwise."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"{out} exists and is not a folder; choose a new or empty folder")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"{out} is not empty; choose a new folder or pass --overwrite")
        for name in OWNED:  # only what this command writes, never anything else in the folder
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)


def write_layout(out: str, annotations: dict[str, Any], classes: Sequence[str], readme: str) -> None:
    """The authors' layout's JSON files (``exp_annotation.json``, ``label_class_id_mapping.json``) and the README."""
    with open(os.path.join(out, "exp_annotation.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(annotations, indent=1) + "\n")
    with open(os.path.join(out, "label_class_id_mapping.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps({n: i for i, n in enumerate(classes)}, indent=1) + "\n")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fixed settings and no metadata chunks: identical pixels give identical files.
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()
