"""``python -m megl_ray.data.make_sample`` and the bundled digits sample built with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megl_ray.data import convert, make_sample
from megl_ray.data.sample import BUNDLED_SAMPLE
from megl_ray.errors import UserError

BUNDLED = BUNDLED_SAMPLE  # the packaged folder itself, whatever $MEGL_SAMPLE_DIR says


def generate(out: Path, *flags: str) -> dict:
    return make_sample.main([str(out), *flags])


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decoy_slots(rgb: np.ndarray) -> list[int]:
    top, side = make_sample.DECOY_TOP, make_sample.DECOY_SIDE
    return [
        k
        for k in range(10)
        if (
            rgb[top : top + side, make_sample.decoy_x(k) : make_sample.decoy_x(k) + side] == make_sample.DECOY_SHADE
        ).all()
    ]


def test_generation_is_deterministic(tmp_path: Path):
    generate(tmp_path / "a", "--n-per-class", "10", "--seed", "3")
    generate(tmp_path / "b", "--n-per-class", "10", "--seed", "3")
    generate(tmp_path / "c", "--n-per-class", "10", "--seed", "4")
    first = all_files(tmp_path / "a")
    assert first == all_files(tmp_path / "b")
    assert first["exp_annotation.json"] != all_files(tmp_path / "c")["exp_annotation.json"]


def test_bundled_folder_equals_a_fresh_generation(tmp_path: Path):
    summary = generate(tmp_path / "fresh", "--n-per-class", "100", "--seed", "0")
    assert summary["images"] == 1000 and summary["with_mask"] == 100
    fresh, bundled = all_files(tmp_path / "fresh"), all_files(BUNDLED)
    assert sorted(fresh) == sorted(bundled)
    for name, data in fresh.items():
        if name.endswith(".png"):
            # PNG bytes depend on the zlib build; the pixels must match exactly everywhere.
            assert np.array_equal(pixels(data), pixels(bundled[name])), name
        else:
            assert data == bundled[name], name
    assert sum(len(d) for d in bundled.values()) < 4_000_000  # lean: 1,000 images in under 4 MB


def test_bundled_sample_content():
    annotations = json.loads((BUNDLED / "exp_annotation.json").read_text())
    mapping = json.loads((BUNDLED / "label_class_id_mapping.json").read_text())
    assert mapping == {name: i for i, name in enumerate(make_sample.CLASS_NAMES)}
    assert len(annotations) == 1000
    assert np.bincount([r["class_id"] for r in annotations.values()]).tolist() == [100] * 10
    with_mask = [r for r in annotations.values() if r["visual_exp"]]
    assert len(with_mask) == 100  # 10 %
    for record in annotations.values():
        assert record["ans"] == make_sample.CLASS_NAMES[record["class_id"]]
        assert 2 <= len(record["exp"]) <= 3 and len(set(record["exp"])) == len(record["exp"])
        assert all(record["ans"] in text for text in record["exp"])
        assert "split" not in record
    for record in with_mask:
        rgb = np.asarray(Image.open(BUNDLED / record["image_path"]))
        mask = np.load(BUNDLED / record["visual_exp"])
        assert rgb.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() > 0.5
        # The mask is the digit's region: every pixel in the stroke colour the rationales name lies inside it, and
        # it holds more than the strokes (the margin) but still mostly light background is outside it.
        colours = [c for c in make_sample.COLOURS if any(f" {c} " in text for text in record["exp"])]
        assert len(colours) >= 1
        stroke = np.abs(rgb.astype(int) - np.array(make_sample.COLOURS[colours[0]])).max(axis=2) <= 1
        assert (mask[stroke] > 0.98).all()  # (ink within ±1 of the colour: alpha ≥ 0.99)
        alpha = np.abs(rgb.astype(int) - rgb[mask == 0].mean(axis=0)).max(axis=2) > 60  # clearly inked pixels
        assert alpha.any() and (mask[alpha] > 0).all() and (mask >= 0.5).sum() > 1.5 * alpha.sum()
        assert rgb[mask == 0].mean() > 190  # light background elsewhere


def test_converting_the_bundled_sample_rejects_nothing(tmp_path: Path):
    summary = convert.main([str(BUNDLED), str(tmp_path / "out")])
    assert summary["rows_in"] == summary["rows_written"] == 1000
    assert summary["rows_rejected"] == 0 and summary["rejected_by_reason"] == {}
    assert (tmp_path / "out" / "rejected.jsonl").read_text() == ""
    assert summary["with_mask"] == 100
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert 0.03 < info["mask_coverage"]["train"] < 0.2
    assert np.isclose(np.sum(info["prior"]), 1.0)


def test_shortcut_decoy_follows_the_label_in_train_but_not_in_test(tmp_path: Path):
    out = tmp_path / "shortcut"
    generate(out, "--n-per-class", "20", "--shortcut")
    annotations = json.loads((out / "exp_annotation.json").read_text())
    matches = {"train": [], "val": [], "test": []}
    for record in annotations.values():
        rgb = np.asarray(Image.open(out / record["image_path"]))
        slots = decoy_slots(rgb)
        assert len(slots) == 1
        matches[record["split"]].append(slots[0] == record["class_id"])
        if record["visual_exp"]:
            mask = np.load(out / record["visual_exp"])
            # the decoy band (and the gap below it) is never part of the evidence, margin included
            assert not mask[: make_sample.DIGIT_TOP_WITH_DECOY - make_sample.MASK_MARGIN].any()
    assert len(matches["train"]) > 100 and len(matches["test"]) > 20
    assert all(matches["train"]) and all(matches["val"])
    assert sum(matches["test"]) / len(matches["test"]) < 0.35  # random slot: ~10 % agree by chance


def test_out_must_be_empty_unless_overwrite(tmp_path: Path):
    out = tmp_path / "s"
    generate(out, "--n-per-class", "1")
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate(out, "--n-per-class", "1")
    generate(out, "--n-per-class", "2", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"
    assert len(list((out / "images").iterdir())) == 20
    with pytest.raises(UserError, match="at most 500"):
        generate(tmp_path / "t", "--n-per-class", "501")
