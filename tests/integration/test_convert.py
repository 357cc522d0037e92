"""``python -m megl_ray.data.convert``: every bad-input kind is caught, counted and explained; good data round-trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.sources import rec, write_source

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- the bad corpus

# id -> (what, reason) expected in rejected.jsonl


def subprocess_convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "megl_ray.data.convert", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_strict_from_the_command_line_has_no_traceback(bad_corpus: Path, tmp_path: Path):
    proc = subprocess_convert(str(bad_corpus), str(tmp_path / "out"), "--strict")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "rejected" in error_lines[0]
    assert "error" in json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("broken", ["exp_annotation.json", "label_class_id_mapping.json"])
def test_malformed_json_gives_file_line_col(tmp_path: Path, broken: str):
    src = tmp_path / "src"
    src.mkdir()
    write_source(src, [("a", rec("images/a.png"))])
    (src / broken).write_text('{\n  "a": 1,\n  "b": 2,\n}\n')
    proc = subprocess_convert(str(src), str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert f"{broken}:4:1: Expecting property name enclosed in double quotes" in error_lines[0]


# ------------------------------------------------------------------------------------------------ splits & content
