"""Ground-truth masks in the forms datasets keep them: ``.npy`` arrays, PNG/JPEG images (greyscale or binary, with
an optional threshold), COCO run-length encodings and COCO polygons — each decoded to one array that
``schema.check_mask`` then validates against its image, whatever the form.

COCO's two encodings are decoded by pycocotools (the reference implementation every COCO tool uses), so a mask
converted here rasterises exactly as it does in the researcher's own COCO tooling. This module imports no Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask

from megl_ray.data import schema
from megl_ray.data.schema import WHAT_MASK, Invalid

MASK_KINDS = ("npy", "image", "rle", "polygons")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class MaskRef:
    """Where one record's mask is: a file under the source root (``path``), or the mask itself (``data``: encoded
    bytes of a ``.npy``/image, a COCO RLE dict or a list of COCO polygons)."""

    kind: str
    """One of ``MASK_KINDS``."""
    path: str | None = None
    """A file relative to the source root (``npy`` and ``image`` kinds)."""
    data: Any = None
    """The mask itself when the source holds it inline."""
    name: str = ""
    """How messages name it (the path, or the column/member it came from)."""


def mask_ref(value: Any, name: str = "") -> MaskRef | None:
    """Interpret a record's mask value: a path (kind by suffix), a COCO RLE dict, COCO polygons (a list of coordinate
    lists, or one flat list), a Hugging Face ``Image`` struct ({bytes, path}), or JSON text holding an RLE or polygons
    (a CSV cell). ``None``/blank: no mask.
    Raises ``Invalid`` (``mask_unreadable``) for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text[0] in "{[":  # a CSV cell holding an RLE or polygons as JSON
            try:
                return mask_ref(json.loads(text), name)
            except json.JSONDecodeError as err:
                raise Invalid(
                    WHAT_MASK, "mask_unreadable", f"mask {name or 'value'} is not valid JSON: {err}"
                ) from None
        suffix = os.path.splitext(text)[1].lower()
        if suffix == ".npy":
            return MaskRef("npy", path=text, name=text)
        if suffix in IMAGE_SUFFIXES:
            return MaskRef("image", path=text, name=text)
        raise Invalid(
            WHAT_MASK,
            "mask_unreadable",
            f"mask file {text!r} is neither .npy nor an image ({', '.join(IMAGE_SUFFIXES)})",
        )
    if isinstance(value, dict) and "bytes" in value and "counts" not in value:  # a Hugging Face ``Image`` struct
        if value["bytes"] is None:
            return mask_ref(value.get("path"), name)
        return MaskRef("image", data=value["bytes"], name=name or "mask image")
    if isinstance(value, dict) and "counts" in value:
        return MaskRef("rle", data=value, name=name or "RLE")
    if isinstance(value, list):
        return MaskRef("polygons", data=value, name=name or "polygons")
    raise Invalid(
        WHAT_MASK,
        "mask_unreadable",
        f"mask {name or 'value'} is a {type(value).__name__}: expected a path, a COCO RLE object or COCO polygons",
    )


def decode_mask(ref: MaskRef, root: str, max_bytes: int, threshold: float | None, height: int, width: int) -> Any:
    """The mask ``ref`` points at, as an array for ``schema.check_mask`` (which checks shape, range and dtype).

    ``threshold`` (in [0, 1]) binarises image masks (a JPEG's soft edges, a PNG saved with anti-aliasing); without
    it a greyscale image is a soft mask (value / 255). RLE and polygons are binary by nature; their stated size must
    be the image's."""
    if ref.kind in ("npy", "image"):
        if ref.path is not None:
            data = _read(ref.path, root, max_bytes)  # bounded before reading (mask_too_large)
        elif len(ref.data) > max_bytes:  # held by the source (an HF column, a tar member): the same bound
            raise Invalid(WHAT_MASK, "mask_too_large", f"mask {ref.name!r} is {len(ref.data)} bytes > {max_bytes}")
        else:
            data = ref.data
        return schema.load_mask(data, ref.name) if ref.kind == "npy" else _image_mask(data, ref.name, threshold)
    if ref.kind == "rle":
        return _rle_mask(ref.data, ref.name, height, width)
    if ref.kind == "polygons":
        return _polygon_mask(ref.data, ref.name, height, width)
    raise ValueError(f"unknown mask kind {ref.kind!r}")


def _read(relative: str, root: str, max_bytes: int) -> bytes:
    path = schema.resolve_inside(root, relative, WHAT_MASK)
    return schema.read_source_file(path, relative, max_bytes, WHAT_MASK)


def _image_mask(data: bytes, name: str, threshold: float | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            grey = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise Invalid(WHAT_MASK, "mask_unreadable", f"cannot read mask {name!r} as an image: {err}") from None
    if threshold is None:
        return grey  # uint8: check_mask reads it as value / 255
    return grey >= round(threshold * 255)


def _rle_mask(rle: Any, name: str, height: int, width: int) -> np.ndarray:
    size = rle.get("size") if isinstance(rle, dict) else None
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise Invalid(WHAT_MASK, "mask_unreadable", f"RLE {name} has no valid size [height, width]: {size!r}")
    if list(size) != [height, width]:
        raise Invalid(
            WHAT_MASK, "mask_shape_mismatch", f"RLE {name} is {size[0]}x{size[1]} (HxW), image is {height}x{width}"
        )
    try:
        if isinstance(counts, list):  # uncompressed RLE: pycocotools compresses it first
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise ValueError(f"run lengths must be non-negative integers summing to {height * width}")
            encoded = coco_mask.frPyObjects({"size": size, "counts": counts}, height, width)
        elif isinstance(counts, (str, bytes)):
            encoded = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"counts is a {type(counts).__name__}")
        return _decode(encoded)
    except (ValueError, TypeError, UnicodeEncodeError) as err:
        raise Invalid(WHAT_MASK, "mask_unreadable", f"cannot decode RLE {name}: {err}") from None


def _polygon_mask(polygons: Any, name: str, height: int, width: int) -> np.ndarray:
    if polygons and all(isinstance(v, (int, float)) for v in polygons):
        polygons = [polygons]  # one flat polygon
    valid = (
        isinstance(polygons, list)
        and polygons
        and all(
            isinstance(p, list)
            and len(p) >= 6
            and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p)
            for p in polygons
        )
    )
    if not valid:
        raise Invalid(
            WHAT_MASK,
            "mask_unreadable",
            f"polygons {name} must be lists of at least 3 x, y pairs (COCO's [[x1, y1, x2, y2, ...], ...])",
        )
    rles = coco_mask.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    return _decode(coco_mask.merge(rles))


def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools' own call of np.array(copy=False) under NumPy 2: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)
