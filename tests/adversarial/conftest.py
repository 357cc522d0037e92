"""A tiny converted dataset (2 classes, 12 images, every split non-empty) shared by the adversarial cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tiny_source(root: Path, n: int = 12) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    records = {}
    for i in range(n):
        name, cid = ("cat", 0) if i % 2 else ("dog", 1)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.zeros((16, 16), np.float32)
        mask[4:9, 4:9] = 1.0
        np.save(root / "masks" / f"{i}.npy", mask)
        split = "test" if i < 2 else "val" if i < 4 else "train"
        records[f"r{i}"] = {
            "image_path": f"images/{i}.png",
            "class_id": cid,
            "ans": name,
            "visual_exp": f"masks/{i}.npy" if i % 3 == 0 else "",
            "split": split,
            "exp": [f"a {name} with fur", f"the {name} sits"],
        }
    (root / "exp_annotation.json").write_text(json.dumps(records))
    (root / "label_class_id_mapping.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The converted tiny dataset; tests that damage it work on ``copy_dataset`` copies."""
    from megl_ray.data import convert

    root = tmp_path_factory.mktemp("adv-data")
    convert.main([str(write_tiny_source(root / "src")), str(root / "ds")])
    return root / "ds"


@pytest.fixture
def copy_dataset(tiny_dataset, tmp_path):
    def make(name: str = "ds") -> Path:
        return Path(shutil.copytree(tiny_dataset, tmp_path / name))

    return make
