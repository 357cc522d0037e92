"""What every adversarial case asserts, in one place.

A bad input to a ``python -m megl_ray.*`` command must end in exactly one of two ways:
* a user error: exit status 2, one line on stderr, ``{"error": ...}`` as the last stdout line, no traceback;
* a counted rejection (record-level problems of the converter): exit 0 and the record in ``rejected.jsonl``.
Either way nothing is written outside the destination the command was given, and the source is left as it was.
The commands run in this process through ``run_cli`` (a subprocess each would pay ~4 s of imports per case).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megl_ray.cli import run_cli


@dataclass
class Outcome:
    code: int
    result: dict[str, Any]
    out: str
    err: str


def snapshot(root: Path, skip: Sequence[Path] = ()) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (not following links, not entering ``skip``): kind, size and content hash."""
    skipped = {str(p) for p in skip}
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path in skipped:
                continue
            info = os.lstat(path)
            digest = ""
            if stat.S_ISREG(info.st_mode) and info.st_size <= 2**26:  # sparse giants: size and mtime suffice
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (
                stat.filemode(info.st_mode)[0],
                info.st_size,
                digest or str(info.st_mtime_ns),
            )
    return found


def run(prog: str, main: Callable[[Sequence[str] | None], dict[str, Any]], argv: Sequence[str], capsys) -> Outcome:
    capsys.readouterr()
    handlers = logging.root.handlers[:]
    try:
        code = run_cli(prog, main, [str(a) for a in argv])
    finally:  # a command that configures logging would leave a handler on this test's captured stderr
        logging.root.handlers[:] = handlers
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines, f"{prog}: nothing on stdout; stderr: {captured.err[-2000:]}"
    return Outcome(code, json.loads(lines[-1]), captured.out, captured.err)


def assert_user_error(outcome: Outcome, *fragments: str) -> None:
    """Exit 2, a JSON error last on stdout (standard JSON: ``json.loads`` above refuses nothing, so check NaN
    separately), one error line on stderr naming each fragment, and no traceback anywhere."""
    assert outcome.code == 2, (outcome.code, outcome.err[-3000:], outcome.out[-500:])
    assert set(outcome.result) == {"error"} and outcome.result["error"], outcome.result
    assert "Traceback" not in outcome.err and "Traceback" not in outcome.out, outcome.err[-3000:]
    error_lines = [line for line in outcome.err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1, outcome.err[-3000:]
    for fragment in fragments:
        assert fragment in outcome.result["error"], (fragment, outcome.result["error"])


def assert_standard_json(text: str) -> None:
    """The last stdout line parses as strict JSON (no NaN/Infinity tokens)."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON number {token} in {text[-300:]!r}")

    json.loads(text.strip().splitlines()[-1], parse_constant=refuse)


def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """A damage function: load ``root/name`` as JSON, let ``change`` edit it in place, write it back."""

    def damage(root: Path) -> None:
        value = json.loads((root / name).read_text())
        change(value)
        (root / name).write_text(json.dumps(value))

    return damage


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


CONVERT = "python -m megl_ray.data.convert"
CAT_DOG = {"cat": 0, "dog": 1}


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


def make_source(root: Path, records: dict[str, object] | None = None, classes: object = CAT_DOG) -> Path:
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
