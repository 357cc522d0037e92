"""Adversarial inputs to ``python -m megl_ray.data.convert``: each a user error (exit 2) or a counted rejection,
never a traceback, a hang, a partial or lost dataset, or a write outside DST."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from megl_ray.data import convert
from tests.support.adversarial import CONVERT, assert_user_error, good_record, make_source, run, snapshot

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


def convert_case(tmp_path: Path, capsys, src: Path, dst: Path, *flags: str):
    """Run the converter; assert the source and everything outside DST are untouched."""
    before = snapshot(tmp_path, skip=[dst])
    outcome = run(CONVERT, convert.main, [src, dst, *flags], capsys)
    assert snapshot(tmp_path, skip=[dst]) == before, "something outside DST changed"
    return outcome


# --------------------------------------------------------------------------------------- whole-run user errors


def _dst_is_src(tmp: Path) -> tuple[Path, Path, list[str]]:
    src = make_source(tmp / "src")
    (src / "train").mkdir()  # a user folder that happens to be called train/: the old --overwrite deleted it
    (src / "train" / "keep.txt").write_text("mine")
    return src, src, ["--overwrite"]


def _dst_inside_src(tmp: Path):
    src = make_source(tmp / "src")
    return src, src / "converted", []


def _dst_not_a_dataset(tmp: Path):
    src = make_source(tmp / "src")
    dst = tmp / "dst"
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "holiday.jpg").write_bytes(b"not ours")
    (dst / "notes.txt").write_text("not ours either")
    return src, dst, ["--overwrite"]


def _dst_is_a_file(tmp: Path):
    src = make_source(tmp / "src")
    (tmp / "dst").write_text("a file")
    return src, tmp / "dst", []


def _source_with(**files: bytes | str | Callable[[Path], None]):
    def build(tmp: Path):
        src = make_source(tmp / "src")
        for name, content in files.items():
            path = src / name.replace("__", ".")
            path.unlink()
            if callable(content):
                content(path)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8", errors="surrogatepass")
        return src, tmp / "dst", []

    return build


def _records(records: dict[str, object], flags=()):
    def build(tmp: Path):
        return make_source(tmp / "src", records), tmp / "dst", list(flags)

    return build


FILE_LEVEL = {
    "dst_is_src_with_overwrite": (_dst_is_src, "source"),
    "dst_inside_src": (_dst_inside_src, "source"),
    "dst_holds_no_dataset_with_overwrite": (_dst_not_a_dataset, "holds no converted dataset"),
    "dst_is_a_file": (_dst_is_a_file, "not a folder"),
    "annotation_nested_100k_deep": (_source_with(exp_annotation__json=DEEP), "nested too deeply"),
    "annotation_not_utf8": (_source_with(exp_annotation__json=b'{"a": "\xff\xfe"}'), "not UTF-8"),
    "annotation_is_a_fifo": (_source_with(exp_annotation__json=os.mkfifo), "FIFO"),
    "annotation_is_a_directory": (_source_with(exp_annotation__json=Path.mkdir), "directory"),
    "annotation_is_an_array": (_source_with(exp_annotation__json="[1, 2]"), "must be a JSON object"),
    "mapping_id_of_5000_digits": (_source_with(label_class_id_mapping__json='{"cat": ' + HUGE + "}"), "integers"),
    "mapping_name_is_image_token": (_source_with(label_class_id_mapping__json='{"<image>": 0, "dog": 1}'), "<image>"),
    "mapping_name_lone_surrogate": (_source_with(label_class_id_mapping__json='{"\\ud800": 0, "dog": 1}'), "UTF-8"),
    "strict_bad_record": (
        _records({"a": good_record("a"), "b": good_record("b", class_id=7)}, ["--strict"]),
        "unknown_class_id",
    ),
    "max_bytes_zero": (_records({"a": good_record("a")}, ["--max-bytes", "0"]), "--max-bytes"),
    "val_fraction_nan": (_records({"a": good_record("a")}, ["--val-fraction", "nan"]), "--val-fraction"),
    "unknown_option": (_records({"a": good_record("a")}, ["--frobnicate"]), "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(FILE_LEVEL))
def test_whole_run_problems_are_one_line_and_leave_everything_as_it_was(case, tmp_path, capsys):
    build, fragment = FILE_LEVEL[case]
    src, dst, flags = build(tmp_path)
    dst_before = snapshot(dst) if dst.is_dir() else None
    outcome = convert_case(tmp_path, capsys, src, dst, *flags)
    assert_user_error(outcome, fragment)
    if dst_before is not None:
        assert snapshot(dst) == dst_before, "DST changed although the conversion failed"
    else:
        assert not dst.exists() or dst.is_file(), "a failed conversion left a partial DST"


def test_overwrite_keeps_the_old_dataset_when_the_new_conversion_fails(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    dst = tmp_path / "dst"
    assert run(CONVERT, convert.main, [src, dst], capsys).code == 0
    old = snapshot(dst)
    bad = make_source(tmp_path / "bad", {"a": good_record("a"), "b": good_record("b", class_id=9)})
    assert_user_error(convert_case(tmp_path, capsys, bad, dst, "--overwrite", "--strict"), "unknown_class_id")
    assert snapshot(dst) == old
    assert run(CONVERT, convert.main, [src, dst, "--overwrite"], capsys).code == 0  # and a good one replaces it
    assert snapshot(dst).keys() == old.keys()


# ------------------------------------------------------------------------------------ record-level rejections


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda src: os.mkfifo(src / name)


def _sparse(name: str, size: int = 10 * 2**30) -> Callable[[Path], None]:
    def make(src: Path) -> None:
        with open(src / name, "wb") as f:
            f.truncate(size)  # 10 GiB that take no disk: read whole, they would exhaust memory

    return make


def _symlink(name: str, target: str) -> Callable[[Path], None]:
    return lambda src: os.symlink(target, src / name)


# case -> (record b's raw JSON or changes, extra file to create, expected (what, reason) of b)
RECORD_LEVEL: dict[str, tuple[object, Callable[[Path], None] | None, tuple[str, str]]] = {
    "rationale_lone_surrogate": (
        '{"image_path": "images/b.png", "class_id": 0, "ans": "cat", "exp": ["\\udc80 x"]}',
        None,
        ("record", "no_usable_rationale"),
    ),
    "id_lone_surrogate": (None, None, ("record", "invalid_text")),
    "class_name_lone_surrogate": (
        '{"image_path": "images/b.png", "class_id": 0, "ans": "\\ud800", "exp": ["x"]}',
        None,
        ("record", "invalid_text"),
    ),
    "nul_in_image_path": ({"image_path": "images/b.png\x00.jpg"}, None, ("record", "path_invalid")),
    "nul_in_mask_path": ({"visual_exp": "masks/\x00b.npy"}, None, ("mask", "mask_path_invalid")),
    "class_id_5000_digits": (
        '{"image_path": "images/b.png", "class_id": ' + HUGE + ', "ans": "cat", "exp": ["x"]}',
        None,
        ("record", "wrong_type"),
    ),
    "class_id_31_digits": ({"class_id": 10**30}, None, ("record", "unknown_class_id")),
    "rationale_with_image_token": ({"exp": ["look at <image> here"]}, None, ("record", "no_usable_rationale")),
    "image_is_a_fifo": (
        {"image_path": "images/pipe.png"},
        _fifo("images/pipe.png"),
        ("record", "image_not_regular_file"),
    ),
    "mask_is_a_fifo": ({"visual_exp": "masks/pipe.npy"}, _fifo("masks/pipe.npy"), ("mask", "mask_not_regular_file")),
    "image_huge_sparse_file": (
        {"image_path": "images/huge.png"},
        _sparse("images/huge.png"),
        ("record", "image_too_large"),
    ),
    "mask_huge_sparse_file": ({"visual_exp": "masks/huge.npy"}, _sparse("masks/huge.npy"), ("mask", "mask_too_large")),
    "image_links_to_dev_zero": (
        {"image_path": "images/zero.png"},
        _symlink("images/zero.png", "/dev/zero"),
        ("record", "path_escape"),
    ),
    "image_is_a_directory": ({"image_path": "masks"}, None, ("record", "image_not_regular_file")),
    "image_symlink_loop": (
        {"image_path": "images/loop.png"},
        _symlink("images/loop.png", "loop.png"),
        ("record", "image_unreadable"),
    ),
    "image_path_too_long": ({"image_path": "images/" + "x" * 5000 + ".png"}, None, ("record", "image_unreadable")),
    "image_path_escapes": ({"image_path": "../../etc/passwd"}, None, ("record", "path_escape")),
    "deeply_nested_rationale": (
        '{"image_path": "images/b.png", "class_id": 0, "ans": "cat", "exp": ' + "[" * 500 + "]" * 500 + "}",
        None,
        ("record", "no_usable_rationale"),
    ),
}


@pytest.mark.parametrize("case", sorted(RECORD_LEVEL))
def test_one_bad_record_is_a_counted_rejection(case, tmp_path, capsys):
    changes, extra, (what, reason) = RECORD_LEVEL[case]
    bad_id = "b\udc80" if case == "id_lone_surrogate" else "b"
    bad = changes if isinstance(changes, str) else good_record("b", **(changes or {}))
    src = make_source(tmp_path / "src", {"a": good_record("a"), bad_id: bad})
    if extra is not None:
        extra(src)
    dst = tmp_path / "dst"
    outcome = convert_case(tmp_path, capsys, src, dst)
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err[-3000:]
    summary = outcome.result
    lines = [json.loads(line) for line in (dst / "rejected.jsonl").read_text().splitlines()]
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_rejected"] == 2
    mine = [(line["what"], line["reason"]) for line in lines if line["id"] == bad_id]
    assert (what, reason) in mine, lines
    assert summary["rows_written"] == (2 if what == "mask" else 1)
    assert (dst / "dataset.json").is_file() and not [p for p in dst.iterdir() if p.name.startswith(".megl")]


def test_a_rationale_with_the_image_token_is_dropped_and_named(tmp_path, capsys):
    src = make_source(tmp_path / "src", {"a": good_record("a", exp=["fine", "see <image>"]), "b": good_record("b")})
    outcome = convert_case(tmp_path, capsys, src, tmp_path / "dst")
    assert outcome.code == 0 and outcome.result["rejected_by_reason"] == {"rationale_has_image_token": 1}
