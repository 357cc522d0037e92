"""Adversarial exports for ``evaluate`` and ``explain`` (the end-of-run gallery loads exports the same way,
through ``export.load_export``): each damaged file is one line naming it and exit 2, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megl_ray import evaluate, explain
from megl_ray.model.export_io import load_export
from tests.support.adversarial import assert_user_error, edit_json, run, snapshot


@pytest.fixture(scope="module")
def export_dir(tiny_dataset, tmp_path_factory) -> Path:
    """An untrained export of the tiny preset for the tiny dataset's classes (building it takes seconds)."""
    from megl_ray.config import load_config, packaged_config
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model import build_megl_model
    from megl_ray.model.export_io import save_export

    info = load_dataset_info(str(tiny_dataset))
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"), ["model.max_text_tokens=8"])
    model = build_megl_model(
        cfg, info.num_classes, corpus=["a cat with fur", "the dog sits"] * 4, prior=torch.as_tensor(info.prior_array())
    )
    out = tmp_path_factory.mktemp("adv-export") / "export"
    save_export(model, cfg, list(info.classes), str(out))
    return out


def _write(name: str, content: bytes | str):
    def damage(root: Path) -> None:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    return damage


def _truncate(name: str, keep: int):
    def damage(root: Path) -> None:
        (root / name).write_bytes((root / name).read_bytes()[:keep])

    return damage


def _fifo(name: str):
    def damage(root: Path) -> None:
        (root / name).unlink()
        os.mkfifo(root / name)

    return damage


def _meta(change):
    return edit_json("meta.json", change)


def _empty_tokenizer(root: Path) -> None:
    shutil.rmtree(root / "tokenizer")
    (root / "tokenizer").mkdir()


def _garbage_tokenizer(root: Path) -> None:
    for path in (root / "tokenizer").iterdir():
        path.write_text("{ not json")


def _wrong_shape(root: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "model.safetensors"))
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(3, 3)
    save_file(state, str(root / "model.safetensors"))


DAMAGE = {
    "weights_truncated": (_truncate("model.safetensors", 4096), "model.safetensors"),
    "weights_garbage": (_write("model.safetensors", b"\x00" * 64), "model.safetensors"),
    "weights_header_claims_2_60_bytes": (
        _write("model.safetensors", struct.pack("<Q", 2**60) + b"{}"),
        "model.safetensors",
    ),
    "weights_is_fifo": (_fifo("model.safetensors"), "FIFO"),
    "weights_wrong_shape": (_wrong_shape, "weights do not fit"),
    "meta_not_json": (_write("meta.json", "{ not json"), "meta.json"),
    "meta_a_list": (_write("meta.json", "[1, 2]"), "meta.json"),
    "meta_nested_deep": (_write("meta.json", "[" * 100_000 + "]" * 100_000), "meta.json"),
    "meta_classes_a_string": (_meta(lambda m: m.update(classes="cat")), "classes"),
    "meta_num_classes_a_string": (_meta(lambda m: m.update(num_classes="2")), "num_classes"),
    "meta_not_utf8": (_write("meta.json", b'{"classes": "\xff"}'), "UTF-8"),
    "config_unparsable": (_write("config.yaml", "model: {classifier: tiny\n"), "config.yaml"),
    "config_not_utf8": (_write("config.yaml", b"model:\n  classifier: t\xefny\n"), "UTF-8"),
    "config_unknown_key": (_write("config.yaml", "model:\n  colour: red\n"), "unknown config key"),
    "config_nan_lr": (_write("config.yaml", "optim:\n  lr: .nan\n"), "finite"),
    "config_duplicate_key": (_write("config.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n"), "duplicate key"),
    "tokenizer_empty": (_empty_tokenizer, "tokenizer"),
    "tokenizer_garbage": (_garbage_tokenizer, "tokenizer"),
    "meta_missing": (lambda root: (root / "meta.json").unlink(), "missing meta.json"),
}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adv-image") / "probe.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "explain"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_export_is_one_line(case, command, export_dir, tiny_dataset, image_file, tmp_path, capsys):
    damage, fragment = DAMAGE[case]
    export = Path(shutil.copytree(export_dir, tmp_path / "export"))
    damage(export)
    before, data_before = snapshot(tmp_path), snapshot(tiny_dataset)
    if command == "evaluate":
        argv = ["--checkpoint", export, "--data", tiny_dataset, "--workers", "1", "--max-new-tokens", "2"]
        outcome = run("python -m megl_ray.evaluate", evaluate.main, argv, capsys)
    else:
        argv = ["--checkpoint", export, image_file, "--out", tmp_path / "explained", "--max-new-tokens", "2"]
        outcome = run("python -m megl_ray.explain", explain.main, argv, capsys)
    assert_user_error(outcome, fragment)
    assert snapshot(tmp_path) == before and snapshot(tiny_dataset) == data_before


def test_the_undamaged_export_loads(export_dir):
    assert load_export(str(export_dir)).classes == ["cat", "dog"]


def test_evaluate_refuses_a_damaged_test_split(export_dir, copy_dataset, tmp_path, capsys):
    ds = copy_dataset()
    shard = json.loads((ds / "dataset.json").read_text())["shards"]["test"][0]
    (ds / shard).write_bytes(b"garbage")
    argv = ["--checkpoint", export_dir, "--data", ds, "--workers", "1", "--out", tmp_path / "eval.json"]
    assert_user_error(run("python -m megl_ray.evaluate", evaluate.main, argv, capsys), "split 'test'")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "sparse_100_gib", "directory", "text"])
def test_explain_refuses_unreadable_images_before_loading_the_model(kind, export_dir, tmp_path, capsys):
    image = tmp_path / "image.png"
    if kind == "fifo":
        os.mkfifo(image)  # read naively, this blocks forever
    elif kind == "sparse_100_gib":
        with open(image, "wb") as f:
            f.truncate(100 * 2**30)
    elif kind == "directory":
        image.mkdir()
    else:
        image.write_text("not an image")
    before = snapshot(tmp_path)
    argv = ["--checkpoint", export_dir, image, "--out", tmp_path / "explained"]
    assert_user_error(run("python -m megl_ray.explain", explain.main, argv, capsys), "image.png")
    assert snapshot(tmp_path) == before
