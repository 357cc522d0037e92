"""Adversarial configs, search spaces, run names and damaged datasets for ``train``, ``train_local``, ``tune`` and
``make_sample``: every one stops before any work with one line and exit 2, writing nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megl_ray import train, train_local, tune
from megl_ray.data import make_sample
from tests.support.adversarial import assert_user_error, edit_json, run, snapshot

TUNE_SPACE = "loss.text_weight:\n  grid: [0.5, 1.0]\n"


def _file(text: str | bytes | None = None, kind: str = "file"):
    """A path maker: a file with ``text``, a FIFO, or a directory."""

    def make(path: Path) -> Path:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return make


BAD_CONFIG_FILES = {
    "duplicate_key": (_file("optim:\n  lr: 0.1\n  lr: 0.2\n"), "duplicate key"),
    "not_utf8": (_file(b"optim:\n  lr: 0.1 # \xe9t\xe9\n"), "not UTF-8"),
    "fifo": (_file(kind="fifo"), "FIFO"),
    "directory": (_file(kind="dir"), "directory"),
    "nested_deep": (_file("a: " + "[" * 20000 + "]" * 20000), "invalid YAML"),
    "alias_bomb": (
        _file(
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 8)}]\n" for i in range(10))
        ),
        "aliases",
    ),
    "unparsable": (_file("optim: {lr: 0.1\n"), "invalid YAML"),
    "top_level_list": (_file("- 1\n- 2\n"), "mapping"),
}

BAD_OVERRIDES = {
    "lr_inf": (["optim.lr=.inf"], "finite"),
    "lr_nan": (["optim.lr=.nan"], "finite"),
    "lr_inf_word": (["optim.lr=inf"], "finite"),
    "text_weight_inf": (["loss.text_weight=1e999"], "finite"),
    "dc_weight_nan": (["loss.dc_weight=nan"], "finite"),
    "hidden_not_even_heads": (["model.tiny_hidden_size=12"], "model.tiny_hidden_size"),
    "hidden_zero": (["model.tiny_hidden_size=0"], "model.tiny_hidden_size"),
    "run_name_dotdot": (["run.name=.."], "run.name"),
    "run_name_dot": (["run.name=."], "run.name"),
    "run_name_backslash": (["run.name=a\\b"], "run.name"),
    "run_name_nul": (["run.name=a\x00b"], "run.name"),
    "run_name_newline": (['run.name="a\\nb"'], "run.name"),
    "not_key_value": (["optim.lr"], "key=value"),
    "unknown_key": (["optim.learning_rate=0.1"], "unknown config key"),
}

ENTRY_POINTS = {
    "train": (train.main, []),
    "train_local": (train_local.main, []),
    "tune": (tune.main, ["--space", "SPACE"]),
}


def _argv(entry: str, tmp_path: Path, rest: list[str]) -> list[str]:
    space = tmp_path / "space.yaml"
    if not space.exists():
        space.write_text(TUNE_SPACE)
    return [str(space) if a == "SPACE" else a for a in ENTRY_POINTS[entry][1]] + rest


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BAD_CONFIG_FILES))
def test_bad_config_files(entry, case, tmp_path, capsys):
    make, fragment = BAD_CONFIG_FILES[case]
    path = make(tmp_path / "config.yaml")
    argv = _argv(entry, tmp_path, ["--config", str(path), f"run.storage_path={tmp_path / 'runs'}"])
    before = snapshot(tmp_path)
    outcome = run(f"megl_ray.{entry}", ENTRY_POINTS[entry][0], argv, capsys)
    assert_user_error(outcome, fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_overrides(entry, case, tmp_path, capsys):
    overrides, fragment = BAD_OVERRIDES[case]
    _argv(entry, tmp_path, [])
    before = snapshot(tmp_path)
    outcome = run(
        f"megl_ray.{entry}",
        ENTRY_POINTS[entry][0],
        _argv(entry, tmp_path, [f"run.storage_path={tmp_path / 'runs'}", *overrides]),
        capsys,
    )
    assert_user_error(outcome, fragment)
    assert snapshot(tmp_path) == before, "a refused run wrote something"


BAD_TUNE = {
    "reduction_factor_nan": (["--reduction-factor", "nan"], TUNE_SPACE, "--reduction-factor"),
    "reduction_factor_inf": (["--reduction-factor", "inf"], TUNE_SPACE, "--reduction-factor"),
    "name_dotdot": (["--name", ".."], TUNE_SPACE, "--name"),
    "space_duplicate_key": ([], TUNE_SPACE + "loss.text_weight:\n  grid: [2.0]\n", "duplicate key"),
    "space_not_utf8": ([], b"loss.text_weight:\n  grid: [0.5] # \xff\n", "not UTF-8"),
    "space_grid_nan": ([], "loss.text_weight:\n  grid: [.nan]\n", "finite"),
    "space_is_fifo": ([], None, "FIFO"),
    "num_samples_not_int": (["--num-samples", "many"], TUNE_SPACE, "--num-samples"),
}


@pytest.mark.parametrize("case", sorted(BAD_TUNE))
def test_bad_tune_arguments(case, tmp_path, capsys):
    flags, space_text, fragment = BAD_TUNE[case]
    space = tmp_path / "space.yaml"
    _file(space_text, "fifo" if space_text is None else "file")(space)
    before = snapshot(tmp_path)
    outcome = run(
        "megl_ray.tune", tune.main, ["--space", str(space), *flags, f"run.storage_path={tmp_path / 'runs'}"], capsys
    )
    assert_user_error(outcome, fragment)
    assert snapshot(tmp_path) == before


def test_make_sample_into_a_file_and_bad_arguments(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("mine")
    assert_user_error(run("megl_ray.data.make_sample", make_sample.main, [target], capsys), "not a folder")
    assert target.read_text() == "mine"
    assert_user_error(
        run("megl_ray.data.make_sample", make_sample.main, [tmp_path / "x", "--n-per-class", "lots"], capsys),
        "--n-per-class",
    )
    assert_user_error(
        run("megl_ray.data.make_sample", make_sample.main, [tmp_path / "y", "--n-per-class", "0"], capsys),
        "--n-per-class",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------------------------------------------------- damaged datasets


def _edit_info(change):
    return edit_json("dataset.json", change)


def _train_shard(ds: Path) -> Path:
    return ds / json.loads((ds / "dataset.json").read_text())["shards"]["train"][0]


def _outside_shard(ds: Path) -> None:
    """A shard path climbing out of the dataset to a real Parquet file beside it."""
    pq.write_table(pq.read_table(_train_shard(ds)), ds.parent / "outside.parquet")
    _edit_info(lambda info: info["shards"].update(train=["../outside.parquet"]))(ds)


DAMAGED = {
    "shard_path_dotdot": (_outside_shard, "'..'"),
    "shard_path_absolute": (_edit_info(lambda i: i["shards"].update(train=["/etc/passwd"])), "absolute"),
    "classes_a_number": (_edit_info(lambda i: i.update(classes=5)), "classes"),
    "mask_size_a_string": (_edit_info(lambda i: i.update(mask_size="64")), "mask_size"),
    "shards_a_list": (_edit_info(lambda i: i.update(shards=["train/part-00000.parquet"])), "shards"),
    "splits_negative": (_edit_info(lambda i: i["splits"].update(train=-1)), "splits.train"),
    "info_nested_deep": (lambda ds: (ds / "dataset.json").write_text("[" * 100_000 + "]" * 100_000), "dataset.json"),
    "info_not_utf8": (lambda ds: (ds / "dataset.json").write_bytes(b'{"classes": "\xff"}'), "dataset.json"),
    "info_is_fifo": (lambda ds: ((ds / "dataset.json").unlink(), os.mkfifo(ds / "dataset.json")), "regular file"),
    "shard_missing": (lambda ds: _train_shard(ds).unlink(), "missing"),
    "shard_truncated": (lambda ds: _train_shard(ds).write_bytes(_train_shard(ds).read_bytes()[:100]), "cannot read"),
    "shard_not_parquet": (lambda ds: _train_shard(ds).write_bytes(b"PAR1 but not really"), "cannot read"),
    "shard_foreign_columns": (lambda ds: pq.write_table(pa.table({"x": [1, 2]}), _train_shard(ds)), "column"),
    "empty_train_split": (
        _edit_info(lambda i: (i["shards"].update(train=[]), i["splits"].update(train=0))),
        "empty train split",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_dataset_stops_train_local_with_one_line(case, copy_dataset, tmp_path, capsys):
    damage, fragment = DAMAGED[case]
    ds = copy_dataset()
    damage(ds)
    before = snapshot(tmp_path)
    outcome = run(
        "megl_ray.train_local", train_local.main, [f"data.uri={ds}", "--export", str(tmp_path / "export")], capsys
    )
    assert_user_error(outcome, fragment)
    assert snapshot(tmp_path) == before
