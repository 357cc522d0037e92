"""The same samples written in every input form ``convert`` reads (the authors' layout, CSV and JSONL manifests, a
Hugging Face dataset saved to disk and as Parquet, WebDataset shards) with masks as ``.npy``, PNG, COCO RLE and COCO
polygons — for tests that check every form converts to the same rows, and rejects the same bad samples alike."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from megl_ray.data.sample import sample_dataset_path

BAD_REASONS = {
    "bad_missing_image": "image_missing",
    "bad_unknown_label": "unknown_class_name",
    "bad_mask_size": "mask_shape_mismatch",
    "bad_blank_rationale": "no_usable_rationale",
}
"""The bad samples every form carries, and the reason each is rejected with (the blank rationale's record also gets a
``rationale_blank`` line)."""


@dataclass
class Sample:
    id: str
    image: bytes
    label: str
    rationales: list[str]
    box: tuple[int, int, int, int] | None  # the mask: x0, y0, x1, y1 (pixels x0..x1-1, y0..y1-1), or none
    split: str | None
    size: tuple[int, int] = (0, 0)  # height, width
    mask_size: tuple[int, int] | None = None  # a different mask size (the bad sample)

    def mask(self) -> np.ndarray:
        h, w = self.mask_size or self.size
        m = np.zeros((h, w), bool)
        x0, y0, x1, y1 = self.box
        m[y0:y1, x0:x1] = True
        return m

    def rle(self) -> dict:
        encoded = coco_mask.encode(np.asfortranarray(self.mask().astype(np.uint8)))
        return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}

    def polygon(self) -> list[list[float]]:
        x0, y0, x1, y1 = self.box
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    def png_mask(self) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.mask().astype(np.uint8) * 255).save(out, format="PNG")
        return out.getvalue()


def samples(n: int = 30, with_bad: bool = True) -> tuple[list[str], list[Sample]]:
    """``n`` samples of the bundled digits (every third one with a rectangular mask, some with a split), and the
    bad ones of ``BAD_REASONS``; and the class names."""
    root = sample_dataset_path()
    records = json.loads((root / "exp_annotation.json").read_text())
    classes = [
        name
        for name, _ in sorted(
            json.loads((root / "label_class_id_mapping.json").read_text()).items(), key=lambda kv: kv[1]
        )
    ]
    out = []
    for i, rid in enumerate(sorted(records)[:n]):
        rec = records[rid]
        data = (root / rec["image_path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        box = (3 + i % 5, 4 + i % 3, width - 5 - i % 4, height - 6) if i % 3 == 0 else None
        split = ("train", "val", "test", None)[i % 4]
        out.append(Sample(f"s{rid}", data, rec["ans"], rec["exp"], box, split, (height, width)))
    if with_bad:
        good = out[0]
        out += [
            Sample("bad_missing_image", b"", good.label, ["a digit"], None, "train", good.size),
            Sample("bad_unknown_label", good.image, "dragon", ["a digit"], None, "train", good.size),
            # in test: it keeps its image (a mask problem drops only the mask), and as polygons its mask fits; the
            # prior, of train masks only, stays that of the 30 good samples in every form
            Sample("bad_mask_size", good.image, good.label, ["a digit"], (1, 1, 8, 8), "test", good.size, (20, 30)),
            Sample("bad_blank_rationale", good.image, good.label, ["   "], None, "train", good.size),
        ]
    return classes, out


def _files(folder: Path, items: list[Sample], mask_form: str) -> dict[str, tuple[str, object]]:
    """Write images (and file masks) under ``folder``; per sample: (image path, mask value) as a record names them."""
    named = {}
    for s in items:
        image = f"images/{s.id}.png"
        if s.image:
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            (folder / image).write_bytes(s.image)
        mask: object = None
        if s.box is not None:
            if mask_form == "npy":
                mask = f"masks/{s.id}.npy"
                (folder / "masks").mkdir(exist_ok=True)
                np.save(folder / mask, s.mask().astype(np.float32))
            elif mask_form == "png":
                mask = f"masks/{s.id}.png"
                (folder / "masks").mkdir(exist_ok=True)
                (folder / mask).write_bytes(s.png_mask())
            elif mask_form == "rle":
                mask = s.rle()
            else:
                mask = s.polygon()
        named[s.id] = (image, mask)
    return named


def write_authors(folder: Path, classes: list[str], items: list[Sample], mask_form: str = "npy") -> Path:
    folder.mkdir(parents=True)
    named = _files(folder, items, mask_form)
    records = {}
    for s in items:
        image, mask = named[s.id]
        label_id = classes.index(s.label) if s.label in classes else 0
        rec = {"image_path": image, "class_id": label_id, "ans": s.label, "exp": s.rationales, "visual_exp": mask or ""}
        if s.split:
            rec["split"] = s.split
        records[s.id] = rec
    (folder / "exp_annotation.json").write_text(json.dumps(records))
    (folder / "label_class_id_mapping.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}))
    return folder


def write_manifest(folder: Path, items: list[Sample], suffix: str, mask_form: str) -> Path:
    """A CSV (one rationale column per rationale, masks as paths or JSON text) or JSONL manifest (a rationale list,
    masks as paths or objects). Columns under other names than the defaults for CSV: ``--map`` must name them."""
    folder.mkdir(parents=True)
    named = _files(folder, items, mask_form)
    path = folder / f"manifest{suffix}"
    if suffix == ".csv":
        width = max(len(s.rationales) for s in items)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sample", "file", "digit", *[f"why{i}" for i in range(width)], "mask", "split"])
            for s in items:
                image, mask = named[s.id]
                whys = s.rationales + [""] * (width - len(s.rationales))
                cell = "" if mask is None else mask if isinstance(mask, str) else json.dumps(mask)
                writer.writerow([s.id, image, s.label, *whys, cell, s.split or ""])
    else:
        with open(path, "w") as f:
            for s in items:
                image, mask = named[s.id]
                row = {"id": s.id, "image": image, "label": s.label, "rationale": s.rationales, "mask": mask}
                if s.split:
                    row["split"] = s.split
                f.write(json.dumps(row) + "\n")
    return path


def hf_dataset(classes: list[str], items: list[Sample]):
    """A ``datasets.Dataset``: ``Image`` columns for the image and the mask, the label as a name (a ``ClassLabel``
    could not hold the unknown one), the rationales as a list."""
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "label": datasets.Value("string"),
            "rationale": datasets.Sequence(datasets.Value("string")),
            "mask": datasets.Image(),
            "split": datasets.Value("string"),
        }
    )
    rows = {
        "id": [s.id for s in items],
        "image": [{"bytes": s.image, "path": None} if s.image else None for s in items],
        "label": [s.label for s in items],
        "rationale": [s.rationales for s in items],
        "mask": [{"bytes": s.png_mask(), "path": None} if s.box else None for s in items],
        "split": [s.split for s in items],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def write_webdataset(folder: Path, items: list[Sample], shards: int = 2, mask_form: str = "png") -> Path:
    """Samples spread over ``shards`` tar files: ``<id>.png``, ``<id>.json``, and ``<id>.mask.png`` (or the mask as
    polygons in the JSON)."""
    folder.mkdir(parents=True)
    for number in range(shards):
        with tarfile.open(folder / f"shard-{number:05d}.tar", "w") as tar:
            for s in items[number::shards]:
                meta = {"label": s.label, "rationale": s.rationales}
                if s.split:
                    meta["split"] = s.split
                members = {"json": json.dumps(meta).encode()}
                if s.image:
                    members["png"] = s.image
                if s.box is not None:
                    if mask_form == "png":
                        members["mask.png"] = s.png_mask()
                    else:
                        meta["mask"] = s.polygon()
                        members["json"] = json.dumps(meta).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s.id}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
