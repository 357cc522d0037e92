"""Adversarial inputs to ``python -m megl_ray.data.convert``: each a user error (exit 2) or a counted rejection,
never a traceback, a hang, a partial or lost dataset, or a write outside DST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megl_ray.data import convert
from tests.support.adversarial import assert_user_error, run

PROG = "python -m megl_ray.data.convert"
CLASSES = {"cat": 0, "dog": 1}


def good_record(name: str = "a", **changes) -> dict:
    record = {
        "image_path": f"images/{name}.png",
        "class_id": 0,
        "ans": "cat",
        "visual_exp": f"masks/{name}.npy",
        "exp": ["a furry cat", "pointy ears"],
    }
    record.update(changes)
    return record


def make_source(root: Path, records: dict[str, object] | None = None, classes: object = CLASSES) -> Path:
    """A valid two-image source; ``records`` replaces exp_annotation.json's body (a str value is raw JSON)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(("a", "b")):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "images" / f"{name}.png")
        mask = np.zeros((8, 8), np.float32)
        mask[2:5, 2:5] = 1.0
        np.save(root / "masks" / f"{name}.npy", mask)
    records = records if records is not None else {"a": good_record("a"), "b": good_record("b")}
    body = ",\n".join(f"{json.dumps(k)}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in records.items())
    (root / "exp_annotation.json").write_text("{" + body + "}")
    (root / "label_class_id_mapping.json").write_text(classes if isinstance(classes, str) else json.dumps(classes))
    return root


# --------------------------------------------------------------------------------------- whole-run user errors


# ------------------------------------------------------------------------------------ record-level rejections


# case -> (record b's raw JSON or changes, extra file to create, expected (what, reason) of b)


@pytest.mark.slow
def test_atomic_overwrite_on_s3(embedded_s3, monkeypatch, tmp_path, capsys):
    """The same guarantees on an object store, where the swap moves objects one by one."""
    from megl_ray import storage

    for key, value in embedded_s3.env().items():
        monkeypatch.setenv(key, value)
    uri = "s3://megl-adversarial/ds"
    src = make_source(tmp_path / "src")
    assert run(PROG, convert.main, [src, uri], capsys).code == 0
    old = sorted(storage.list_files(uri))
    bad = make_source(tmp_path / "bad", {"a": good_record("a"), "b": good_record("b", class_id=9)})
    assert_user_error(run(PROG, convert.main, [bad, uri, "--overwrite", "--strict"], capsys), "unknown_class_id")
    assert sorted(storage.list_files(uri)) == old
    assert run(PROG, convert.main, [src, uri, "--overwrite"], capsys).code == 0
    assert sorted(storage.list_files(uri)) == old and not any(convert.STAGING_PREFIX in f for f in old)
    from megl_ray.data.schema import load_dataset_info

    assert sum(load_dataset_info(uri).splits.values()) == 2
