"""make_animals: the second shortcut benchmark (label-coloured frames on animal silhouettes)."""

import gzip
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from megl_ray.data import make_animals
from megl_ray.errors import UserError


def _records(out):
    return json.loads((out / "exp_annotation.json").read_text())


def test_frames_encode_the_label_in_train_and_val_and_are_random_in_test_and_never_touch_the_masks(tmp_path):
    out = tmp_path / "a"
    summary = make_animals.main([str(out), "--shortcut", "--train-per-class", "10", "--val-per-class", "2",
                                 "--test-per-class", "4"])  # fmt: skip
    records = _records(out)
    assert summary["images"] == len(records) == 160
    agree = {"train": [], "val": [], "test": []}
    for rec in records.values():
        rgb = np.asarray(Image.open(out / rec["image_path"]))
        frame = rgb[0, 32]
        colour = make_animals.FRAME_COLOURS.index(tuple(int(c) for c in frame))
        assert (rgb[: make_animals.FRAME] == frame).all() and (rgb[:, -make_animals.FRAME :] == frame).all()
        agree[rec["split"]].append(colour == rec["class_id"])
        if rec["visual_exp"]:
            mask = np.load(out / rec["visual_exp"])
            assert mask.shape == (64, 64) and mask.max() > 0.9
            assert mask[: make_animals.FRAME].max() == mask[:, : make_animals.FRAME].max() == 0
    assert all(agree["train"]) and all(agree["val"]) and sum(agree["test"]) < len(agree["test"]) / 2
    masked = {s: sum(1 for r in records.values() if r["split"] == s and r["visual_exp"]) for s in agree}
    assert masked == {"train": 10, "val": 0, "test": 40}  # 10 % of train (1 of 10 per class, 0 of 2), every test
    again = tmp_path / "b"
    make_animals.main([str(again), "--shortcut", "--train-per-class", "10", "--val-per-class", "2",
                       "--test-per-class", "4"])  # fmt: skip
    assert _records(again) == records  # a pure function of the arguments


def test_the_pretrain_part_shares_no_silhouette_with_the_main_part():
    images, labels = make_animals.silhouettes()
    assert images.shape == (10000, 28, 28) and sorted(np.bincount(labels)) == [1000] * 10
    # each part takes a disjoint half of every class (first 500 / last 500 rows)
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        assert len(set(rows[:500]) & set(rows[500:1000])) == 0


def test_the_silhouette_files_are_read_without_running_pickled_code():
    payload = pickle.dumps(print)  # a global other than numpy's array parts
    with pytest.raises(pickle.UnpicklingError, match="not a numpy array part"):
        make_animals._NumpyOnly(io.BytesIO(payload)).load()
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    blob = gzip.compress(pickle.dumps(arr))
    assert np.array_equal(make_animals._NumpyOnly(io.BytesIO(gzip.decompress(blob))).load(), arr)


def test_bad_counts_are_one_line():
    with pytest.raises(UserError, match="per-class counts"):
        make_animals.main(["/tmp/never", "--train-per-class", "400", "--test-per-class", "200"])
