"""The converted dataset's format: the Parquet row schema, ``dataset.json`` (``DatasetInfo``) and record checks.

One Parquet row per image. Images keep their original encoded bytes (so no quality is lost and the bytes can be
checked against the source); masks are stored already area-resized to ``mask_size``² uint8, because every consumer
(Grad-CAM supervision, the prior) works at that size and a fixed-size mask keeps rows small and uniform.

The check functions raise ``Invalid`` with a stable snake_case ``reason`` code; the converter turns each into one
``rejected.jsonl`` line (or, with ``--strict``, a ``UserError``). This module imports no Ray.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from megl_ray.config import safe_io
from megl_ray.data.dataset_info import (  # noqa: F401 - the format's names, importable from here as before
    DATASET_INFO_FILE,
    FORMAT_VERSION,
    SPLITS,
    DatasetInfo,
    load_dataset_info,
)
from megl_ray.data.tokens import IMAGE_TOKEN

REJECTED_FILE = "rejected.jsonl"
MAX_INT_DIGITS = 32
"""Longer JSON integers are not parsed (Python refuses > 4300 digits anyway): no id or count is that long."""

# What a rejection is about: the whole record (not written), its mask (record written without it) or one rationale
# (dropped from the list).
WHAT_RECORD, WHAT_MASK, WHAT_RATIONALE = "record", "mask", "rationale"

# Stable reason codes, one per kind of problem; tests and dashboards key on these, so never rename one.
RECORD_REASONS = (
    "not_an_object",
    "missing_field",
    "wrong_type",
    "duplicate_field",
    "duplicate_id",
    "bad_split",
    "path_escape",
    "image_missing",
    "image_unreadable",
    "not_an_image",
    "image_corrupt",
    "decompression_bomb",
    "unknown_class_id",
    "unknown_class_name",
    "class_name_mismatch",
    "no_usable_rationale",
    "invalid_text",
    "path_invalid",
    "image_not_regular_file",
    "image_too_large",
    "bad_json",
)
MASK_REASONS = (
    "mask_path_escape",
    "mask_missing",
    "mask_unreadable",
    "mask_wrong_rank",
    "mask_bad_dtype",
    "mask_not_finite",
    "mask_negative",
    "mask_out_of_range",
    "mask_all_zero",
    "mask_shape_mismatch",
    "mask_path_invalid",
    "mask_not_regular_file",
    "mask_too_large",
)
RATIONALE_REASONS = ("rationale_blank", "rationale_not_text", "rationale_invalid_text", "rationale_has_image_token")

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # original encoded file bytes
        pa.field("image_format", pa.string(), nullable=False),  # lower-case PIL format name: "png", "jpeg", ...
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("has_mask", pa.bool_(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),  # uint8 mask_size x mask_size, row-major; null without mask
        pa.field("rationales", pa.list_(pa.field("item", pa.string(), nullable=False)), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)


def parquet_schema(mask_size: int) -> pa.Schema:
    """The row schema with metadata naming the format version and the mask size (needed to reshape ``mask``)."""
    return PARQUET_SCHEMA.with_metadata(
        {b"megl_ray.format_version": str(FORMAT_VERSION).encode(), b"megl_ray.mask_size": str(mask_size).encode()}
    )


class Invalid(Exception):
    """One problem with one record: ``what`` (record|mask|rationale), a stable ``reason`` code, a human ``detail``."""

    def __init__(self, what: str, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.what, self.reason, self.detail = what, reason, detail


def _record(reason: str, detail: str) -> Invalid:
    return Invalid(WHAT_RECORD, reason, detail)


def _mask(reason: str, detail: str) -> Invalid:
    return Invalid(WHAT_MASK, reason, detail)


# ---------------------------------------------------------------------------------------------------- record fields


class JsonObject(list):
    """A JSON object kept as its (key, value) pairs in file order, duplicates included.

    Plain ``json.load`` silently keeps the last of duplicate keys; the MEGL layout keys records by id, so a
    duplicated id would vanish without trace. Parsing objects into this type lets the caller see every pair.
    """


class HugeNumber:
    """A JSON integer with more than ``MAX_INT_DIGITS`` digits, kept unparsed so that its record is rejected alone."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"{self.digits[:12]}... ({len(self.digits)} digits)"


def _parse_int(digits: str) -> int | HugeNumber:
    return int(digits) if len(digits) <= MAX_INT_DIGITS else HugeNumber(digits)


def parse_json(text: str) -> Any:
    """Parse JSON text with every object as a ``JsonObject``; raises ``json.JSONDecodeError`` on bad syntax and
    ``RecursionError`` on absurd nesting. Over-long integers become ``HugeNumber`` (see ``MAX_INT_DIGITS``)."""
    return json.loads(text, object_pairs_hook=JsonObject, parse_int=_parse_int)


def text_problem(value: str) -> str | None:
    """Why a string from a data file cannot be stored as UTF-8 (a lone surrogate such as ``"\\ud800"``), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds {value[err.start]!r} at index {err.start}, which is not encodable as UTF-8"
    return None


_REQUIRED = {"image_path": str, "class_id": int, "ans": str, "exp": list}


def check_record_fields(record: Any) -> dict[str, Any]:
    """Check a parsed annotation record's structure and types; return it as a plain dict.

    ``record`` is a dict, or a ``JsonObject`` as parsed by ``parse_json`` (so that a key given twice is caught
    rather than silently overwritten). ``visual_exp`` and ``split`` are optional.
    """
    if isinstance(record, JsonObject):
        fields: dict[str, Any] = {}
        for key, value in record:
            if key in fields:
                raise _record("duplicate_field", f"field {key!r} given more than once")
            fields[key] = value
    elif isinstance(record, dict):
        fields = dict(record)
    else:
        raise _record("not_an_object", f"record is a JSON {_json_type(record)}, not an object")
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise _record("missing_field", f"missing field(s): {', '.join(missing)}")
    for key, typ in _REQUIRED.items():
        value = fields[key]
        # bool is an int subclass in Python, but true/false is no class id.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise _record("wrong_type", f"field {key!r} must be a JSON {_JSON_NAMES[typ]}, got {_json_type(value)}")
    if not fields["image_path"].strip():
        raise _record("wrong_type", "field 'image_path' is empty")
    visual = fields.get("visual_exp")
    if visual is not None and not isinstance(visual, (str, list, dict)):  # a path, COCO polygons or an RLE object
        raise _record(
            "wrong_type", f"field 'visual_exp' must be a path, a COCO RLE object or polygons, got {_json_type(visual)}"
        )
    for key in ("image_path", "ans", "visual_exp", "split"):
        problem = text_problem(fields[key]) if isinstance(fields.get(key), str) else None
        if problem:
            raise _record("invalid_text", f"field {key!r} {problem}")
    if "split" in fields and fields["split"] not in SPLITS:
        raise _record("bad_split", f"field 'split' is {fields['split']!r}; expected one of {', '.join(SPLITS)}")
    return fields


_JSON_NAMES = {str: "string", int: "integer", list: "array"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, HugeNumber):
        return f"an integer of {len(value.digits)} digits"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, JsonObject):
        return "object"
    if isinstance(value, list):
        return "array"
    return "object"


def resolve_label(label: Any, label_name: str | None, classes: list[str]) -> tuple[int, str]:
    """A record's class as (id, name): ``label`` is a class id, or a name (a name equal to a class wins over reading
    it as a number: a class may be called "3"); ``label_name`` (the authors' ``ans``) must then name the same class.
    Reasons: ``missing_field``, ``wrong_type``, ``unknown_class_id``, ``unknown_class_name``,
    ``class_name_mismatch``."""
    if label is None or (isinstance(label, str) and not label.strip()):
        raise _record("missing_field", "the sample has no label")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, str):
        name = label.strip()
        if name in classes:
            label = classes.index(name)
        elif name.lstrip("-").isdigit():
            label = int(name)
        else:
            raise _record("unknown_class_name", f"class name {name!r} is not in the mapping")
    if not isinstance(label, int) or isinstance(label, bool):
        raise _record("wrong_type", f"label must be a class name or id, got {_json_type(label)}")
    check_class(label, classes[label] if label_name is None and 0 <= label < len(classes) else label_name, classes)
    return label, classes[label]


def check_class(class_id: int, class_name: str, classes: list[str]) -> None:
    """Check that ``class_id`` exists and that ``class_name`` is the mapping's name for it."""
    if not 0 <= class_id < len(classes):
        raise _record("unknown_class_id", f"class_id {class_id} is not in the mapping (0..{len(classes) - 1})")
    if class_name not in classes:
        raise _record("unknown_class_name", f"class name {class_name!r} is not in the mapping")
    if classes[class_id] != class_name:
        raise _record(
            "class_name_mismatch",
            f"class_id {class_id} is {classes[class_id]!r} in the mapping, but the record says {class_name!r}",
        )


def clean_rationales(items: list[Any]) -> tuple[list[str], list[Invalid]]:
    """Keep the non-blank text rationales (whitespace-trimmed); return them and one ``Invalid`` per dropped item."""
    kept: list[str] = []
    dropped: list[Invalid] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            dropped.append(Invalid(WHAT_RATIONALE, "rationale_not_text", f"exp[{index}] is a {_json_type(item)}"))
        elif not item.strip():
            dropped.append(Invalid(WHAT_RATIONALE, "rationale_blank", f"exp[{index}] is blank"))
        elif text_problem(item):
            dropped.append(Invalid(WHAT_RATIONALE, "rationale_invalid_text", f"exp[{index}] {text_problem(item)}"))
        elif IMAGE_TOKEN in item:
            dropped.append(
                Invalid(
                    WHAT_RATIONALE,
                    "rationale_has_image_token",
                    f"exp[{index}] contains {IMAGE_TOKEN!r}, the prompt's image placeholder",
                )
            )
        else:
            kept.append(item.strip())
    return kept, dropped


def resolve_inside(root: str, relative: str, what: str = WHAT_RECORD) -> str:
    """Resolve ``relative`` under ``root`` and refuse anything that lands outside it (``..``, absolute, symlinks):
    reason ``path_escape`` (``mask_path_escape``), or ``path_invalid`` for a path no filesystem accepts (NUL)."""
    prefix = "mask_" if what == WHAT_MASK else ""
    try:
        return safe_io.resolve_inside(root, relative)
    except ValueError as err:
        reason = "path_invalid" if "\x00" in relative else "path_escape"
        raise Invalid(what, prefix + reason, str(err)) from None


# ---------------------------------------------------------------------------------------------------------- images


def read_source_file(path: str, relative: str, limit: int, what: str) -> bytes:
    """An image's or mask's bytes, bounded (``safe_io.read_bytes``: regular files only, size checked first);
    problems raise ``Invalid`` with reason ``image_<kind>`` or ``mask_<kind>``."""
    try:
        return safe_io.read_bytes(path, limit, f"{what} file")
    except safe_io.FileProblem as problem:
        reason = f"{'mask' if what == WHAT_MASK else 'image'}_{problem.kind}"
        raise Invalid(what, reason, problem.detail.replace(repr(path), repr(relative))) from None


def check_image_bytes(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Validate encoded image bytes by decoding them; return (format, width, height).

    The pixel count is checked from the header before anything is decoded, so a decompression bomb never
    allocates its pixels; PIL's own bomb guard is pointed at the same limit and its error/warning mapped too.
    """
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise _record("decompression_bomb", f"header exceeds --max-pixels {max_pixels}: {err}") from None
            except UnidentifiedImageError:
                raise _record("not_an_image", "file is not an image format that can be read") from None
            except Exception as err:  # noqa: BLE001 - any parser failure on a header means a corrupt file
                raise _record("image_corrupt", f"cannot parse image header: {err}") from None
            with image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _record(
                        "decompression_bomb", f"{width}x{height} = {width * height} pixels > limit {max_pixels}"
                    )
                if width < 1 or height < 1:
                    raise _record("image_corrupt", f"image has size {width}x{height}")
                try:
                    image.load()
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                    raise _record("decompression_bomb", str(err)) from None
                except Exception as err:  # noqa: BLE001 - truncated data, bad CRC, bad codec stream...
                    raise _record("image_corrupt", f"cannot decode image: {err}") from None
                fmt = (image.format or "unknown").lower()
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    return fmt, width, height


# ----------------------------------------------------------------------------------------------------------- masks


def load_mask(data: bytes, relative: str) -> np.ndarray:
    """Parse a ``.npy`` mask's bytes without unpickling (a pickle in a data set could run code)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the same problem to the user
        raise _mask("mask_unreadable", f"cannot read mask {relative!r} as .npy: {err}") from None


def check_mask(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Validate a source mask against its image and return it as float64 (H, W) in [0, 1].

    Accepts (H, W) or (C, H, W) with C in {1, 3} (channels averaged); float in [0, 1], uint8 (0..255) or bool.
    """
    if not isinstance(array, np.ndarray):
        raise _mask("mask_unreadable", f"mask is a {type(array).__name__}, not an array")
    if array.ndim == 3 and array.shape[0] in (1, 3):
        channels = array
    elif array.ndim == 2:
        channels = array[None]
    else:
        raise _mask("mask_wrong_rank", f"mask has shape {array.shape}; expected (H, W) or (3, H, W)")
    if channels.shape[1:] != (height, width):
        raise _mask(
            "mask_shape_mismatch", f"mask is {channels.shape[1]}x{channels.shape[2]} (HxW), image is {height}x{width}"
        )
    if array.dtype == np.uint8:
        values = channels.astype(np.float64) / 255.0
    elif array.dtype == np.bool_:
        values = channels.astype(np.float64)
    elif np.issubdtype(array.dtype, np.floating):
        values = channels.astype(np.float64)
        if not np.isfinite(values).all():
            raise _mask("mask_not_finite", "mask holds NaN or infinite values")
        if (values < 0).any():
            raise _mask("mask_negative", f"mask has negative values (min {values.min():.4g})")
        if (values > 1).any():
            raise _mask("mask_out_of_range", f"float mask has values above 1 (max {values.max():.4g}); expected [0, 1]")
    else:
        raise _mask("mask_bad_dtype", f"mask dtype is {array.dtype}; expected float in [0, 1], uint8 or bool")
    mask = values.mean(axis=0)
    if not mask.any():
        raise _mask("mask_all_zero", "mask is all zero")
    return mask


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix: entry [i, j] is the fraction of output cell i covered by input cell j."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (n_in / n_out)


def area_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """Exact area (box-average) resize of a 2-D array to (size, size); each output cell is the mean over its area.

    Works for shrinking and enlarging alike and keeps the mean: ``area_resize(m, s).mean() == m.mean()``.
    """
    mask = np.asarray(mask, dtype=np.float64)
    rows = _area_weights(mask.shape[0], size)
    cols = _area_weights(mask.shape[1], size)
    return rows @ mask @ cols.T


def mask_to_bytes(mask: np.ndarray, size: int) -> bytes:
    """Area-resize a [0, 1] mask to size² and quantise to uint8 row-major bytes (the ``mask`` column)."""
    small = np.clip(np.rint(area_resize(mask, size) * 255.0), 0, 255).astype(np.uint8)
    if not small.any():
        # A faint mask can vanish in quantisation; an all-zero stored mask would break normalising consumers.
        raise _mask("mask_all_zero", f"mask is all zero once resized to {size}x{size} uint8")
    return small.tobytes()


def mask_from_bytes(data: bytes, size: int) -> np.ndarray:
    """Decode the ``mask`` column back to a (size, size) uint8 array."""
    array = np.frombuffer(data, dtype=np.uint8)
    if array.size != size * size:
        raise ValueError(f"mask has {array.size} bytes, expected {size}x{size}")
    return array.reshape(size, size)


def prior_term(mask: np.ndarray, prior_size: int) -> np.ndarray:
    """One mask's contribution to the prior: area-resized to prior_size² and normalised to sum 1."""
    small = area_resize(mask, prior_size)
    return small / small.sum()
