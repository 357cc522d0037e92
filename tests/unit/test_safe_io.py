"""``megl_ray.config.safe_io``: bounded reads of regular files only, and path confinement."""

import os

import pytest

from megl_ray.config import safe_io


def test_read_bytes_refuses_fifos_directories_and_oversized_files_before_reading(tmp_path):
    (tmp_path / "ok").write_bytes(b"12345")
    assert safe_io.read_bytes(tmp_path / "ok", 5) == b"12345"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(2**40)  # a terabyte that takes no disk
    for name, kind in [
        ("fifo", "not_regular_file"),
        ("dir", "not_regular_file"),
        ("sparse", "too_large"),
        ("nope", "missing"),
    ]:
        with pytest.raises(safe_io.FileProblem) as err:
            safe_io.read_bytes(tmp_path / name, 2**20)
        assert err.value.kind == kind, name
    with pytest.raises(safe_io.FileProblem, match="too_large|limit"):
        safe_io.read_bytes(tmp_path / "ok", 4)
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    with pytest.raises(safe_io.FileProblem, match="not UTF-8"):
        safe_io.read_text(tmp_path / "latin1")


def test_names_and_relative_paths_cannot_climb_out(tmp_path):
    assert safe_io.check_name("exp-1") is None
    for bad in ("", ".", "..", "a/b", "a\\b", "a\x00b", "a\nb"):
        assert safe_io.check_name(bad), bad
    assert safe_io.check_relative("train/part-00000.parquet") is None
    for bad in ("../x", "train/../../x", "/etc/passwd", "s3://b/k", "C:\\x", "a\x00b", ""):
        assert safe_io.check_relative(bad), bad
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "out")
    for bad in ("../x", "out/passwd", "/etc/passwd", "a\x00b"):
        with pytest.raises(ValueError):
            safe_io.resolve_inside(str(tmp_path / "root"), bad)
    assert safe_io.overlaps(str(tmp_path), str(tmp_path / "root" / "x"))
    assert not safe_io.overlaps(str(tmp_path / "root"), str(tmp_path / "other"))
