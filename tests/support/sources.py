"""Source folders in the MEGL authors' layout for the converter's tests: images (good and bad), records, and the
corpus of every bad-input kind the converter must reject with its reason."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from megl_ray.data import convert

CLASSES = {"cat": 0, "dog": 1, "bird": 2}


def save_image(path: Path, width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def bomb_png(path: Path) -> None:
    """A 1x1 PNG whose header claims 100000x100000 pixels."""
    save_image(path, 1, 1, 0)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))


def write_source(root: Path, entries: list[tuple[str, object]], classes: dict = CLASSES) -> Path:
    """Write exp_annotation.json from (id, record) pairs; a str record is inserted verbatim (raw JSON)."""
    body = ",\n".join(f"{json.dumps(rid)}: {rec if isinstance(rec, str) else json.dumps(rec)}" for rid, rec in entries)
    (root / "exp_annotation.json").write_text("{\n" + body + "\n}\n")
    (root / "label_class_id_mapping.json").write_text(json.dumps(classes))
    return root


def rec(image: str, class_id: int = 0, name: str = "cat", mask: str = "", exp=("a furry cat",), **extra) -> dict:
    return {"image_path": image, "class_id": class_id, "ans": name, "visual_exp": mask, "exp": list(exp), **extra}


def run(src: Path, dst: Path, *flags: str) -> dict:
    return convert.main([str(src), str(dst), *flags])


def write_bad_corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    images = src / "images"
    save_image(images / "good1.png", 16, 12, 1)
    save_image(images / "good2.jpg", 20, 10, 2, "JPEG")
    save_image(images / "good3.png", 8, 8, 3)
    save_image(tmp_path / "outside.png", 8, 8, 4)
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    (images / "adir.png").mkdir()
    (images / "text.png").write_text("this is not an image")
    (images / "truncated.png").write_bytes(save_image(images / "t.png", 40, 40, 5)[:300])
    bomb_png(images / "bomb.png")
    masks = src / "masks"
    masks.mkdir()
    good_mask = np.zeros((12, 16), np.float32)
    good_mask[2:6, 4:12] = 0.75
    np.save(masks / "good.npy", good_mask)
    np.save(masks / "good_u8.npy", np.full((3, 10, 20), 200, np.uint8))
    (masks / "text.npy").write_text("not numpy")
    np.save(tmp_path / "outside.npy", good_mask)
    for name, array in {
        "rank.npy": np.ones((2, 12, 16), np.float32),
        "dtype.npy": np.ones((12, 16), np.int64),
        "nan.npy": np.full((12, 16), np.nan, np.float32),
        "neg.npy": np.full((12, 16), -1.0, np.float32),
        "range.npy": np.full((12, 16), 2.0, np.float32),
        "zero.npy": np.zeros((12, 16), np.float32),
        "shape.npy": np.ones((16, 12), np.float32),
    }.items():
        np.save(masks / name, array)
    good = "images/good1.png"
    entries = [
        ("good1", rec(good, mask="masks/good.npy")),
        ("good2", rec("images/good2.jpg", 1, "dog", mask="masks/good_u8.npy", exp=["a dog", "wet nose"])),
        ("good3", rec("images/good3.png", 2, "bird")),
        ("not_object", "[1, 2]"),
        ("missing", json.dumps({"image_path": good, "class_id": 0, "ans": "cat"})),
        ("wrong_type", rec(good, exp=["x"], class_id="0")),
        ("dup_field", '{"image_path": "images/good1.png", "class_id": 0, "class_id": 1, "ans": "cat", "exp": ["x"]}'),
        ("good1", rec("images/good3.png", 2, "bird")),
        ("bad_split", rec(good, split="training")),
        ("escape_dotdot", rec("../outside.png")),
        ("escape_abs", rec(str(tmp_path / "outside.png"))),
        ("escape_link", rec("images/link.png")),
        ("img_missing", rec("images/nope.png")),
        ("img_dir", rec("images/adir.png")),
        ("img_text", rec("images/text.png")),
        ("img_truncated", rec("images/truncated.png")),
        ("img_bomb", rec("images/bomb.png")),
        ("cls_unknown", rec(good, 7, "cat")),
        ("cls_name_unknown", rec(good, 0, "dragon")),
        ("cls_mismatch", rec(good, 1, "cat")),
        ("no_rationale", rec(good, exp=["   ", 5])),
        ("m_escape", rec(good, mask="../outside.npy")),
        ("m_missing", rec(good, mask="masks/nope.npy")),
        ("m_unreadable", rec(good, mask="masks/text.npy")),
        ("m_rank", rec(good, mask="masks/rank.npy")),
        ("m_dtype", rec(good, mask="masks/dtype.npy")),
        ("m_nan", rec(good, mask="masks/nan.npy")),
        ("m_negative", rec(good, mask="masks/neg.npy")),
        ("m_range", rec(good, mask="masks/range.npy")),
        ("m_zero", rec(good, mask="masks/zero.npy")),
        ("m_shape", rec(good, mask="masks/shape.npy")),
        ("r_blank", rec(good, exp=["a cat", "  \n "])),
        ("r_number", rec(good, exp=[3.5, "a cat"])),
    ]
    return write_source(src, entries)
