"""What every input form is read into before validation: a ``SourceRecord`` per sample, a ``Source`` that lists them,
the column mapping of ``--map``, and the label and split rules the forms share.

A source only *reads*: it turns its rows, members or records into ``SourceRecord`` s and leaves every judgement
(does the image decode, is the label known, does the mask fit) to the converter, so that each bad record gets the
same reason code whatever form it came in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from megl_ray.data.masks import MaskRef, mask_ref
from megl_ray.data.schema import SPLITS, WHAT_RECORD, Invalid, text_problem
from megl_ray.errors import UserError

FIELDS = ("id", "image", "label", "rationale", "mask", "split")
"""The keys of ``--map key=<column>``: what a manifest, HF dataset or WebDataset sample supplies."""
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "image": ("image", "image_path", "file_name", "path"),
    "label": ("label", "class_name", "class", "ans"),
    "rationale": ("rationale", "rationales", "exp", "explanation"),
    "mask": ("mask", "mask_path", "visual_exp"),
    "split": ("split",),
}
"""The column names each field is looked up under when ``--map`` does not name one (first found wins)."""
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
"""Split names other tools use (Hugging Face's ``validation``), read as ours."""


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One sample as its source gives it, not yet validated."""

    image: str | bytes | None
    """A path relative to the source root, the encoded image itself, or None (the sample has none)."""
    image_name: str
    """How messages name the image."""
    label: Any
    """A class name or a class id."""
    rationales: list[Any]
    mask: MaskRef | None = None
    split: str | None = None
    label_name: str | None = None
    """The authors' layout gives both the id and the name (``ans``): the name is checked against the id."""


class Source:
    """An input form opened for reading. ``blocks`` lists ``(id, locator)`` pairs in groups that can be read in any
    order within a group (a whole folder or table is one group; a row group or tar shard each one of several);
    ``record(locator)`` reads one sample and may raise ``Invalid``."""

    form: str = ""
    """The ``--format`` name."""
    root: str = ""
    """The folder relative paths resolve in (and that DST must stay out of)."""
    classes: list[str]
    """Class names indexed by id."""

    def blocks(self) -> list[list[tuple[str, Any]]]:
        raise NotImplementedError

    def record(self, locator: Any) -> SourceRecord:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.form} source {self.root}"


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Which column (key, member) holds each field; ``rationale`` may name several."""

    columns: dict[str, tuple[str, ...]]

    @classmethod
    def parse(cls, items: Sequence[str]) -> ColumnMap:
        """``["image=path", "rationale=r1,r2", "rationale=r3"]`` -> the map; unknown keys are a ``UserError``."""
        columns: dict[str, tuple[str, ...]] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            names = tuple(v.strip() for v in value.split(",") if v.strip())
            if not sep or key not in FIELDS or not names:
                raise UserError(f"--map {item!r}: expected KEY=COLUMN[,COLUMN...] with KEY one of {', '.join(FIELDS)}")
            if key != "rationale" and (len(names) > 1 or key in columns):
                raise UserError(f"--map {item!r}: {key} takes one column")
            columns[key] = columns.get(key, ()) + names
        return cls(columns)

    def pick(self, key: str, available: Iterable[str]) -> tuple[str, ...]:
        """The columns of ``key`` among ``available``: the mapped ones (all must exist), else the first default."""
        available = list(available)
        if key in self.columns:
            missing = [c for c in self.columns[key] if c not in available]
            if missing:
                raise UserError(
                    f"--map {key}={','.join(self.columns[key])}: no column {missing[0]!r} "
                    f"(the source has: {', '.join(available[:20])})"
                )
            return self.columns[key]
        if key == "rationale":  # every default rationale column present (``exp`` and ``explanation`` alike)
            return tuple(c for c in DEFAULT_COLUMNS[key] if c in available)
        return next(((c,) for c in DEFAULT_COLUMNS[key] if c in available), ())


def require_columns(columns: ColumnMap, available: Iterable[str], where: str) -> dict[str, tuple[str, ...]]:
    """Resolve every field's columns for a source whose columns are known up front; image, label and rationale
    must be found (a ``UserError`` naming ``--map`` otherwise)."""
    available = list(available)
    picked = {key: columns.pick(key, available) for key in FIELDS}
    for key in ("image", "label", "rationale"):
        if not picked[key]:
            raise UserError(
                f"{where}: no {key} column (looked for {', '.join(DEFAULT_COLUMNS[key])}; "
                f"it has {', '.join(available[:20])}): name it with --map {key}=<column>"
            )
    return picked


def rationale_list(values: Sequence[Any]) -> list[Any]:
    """The rationales of a sample from its rationale columns: a column may hold one text or a list of them;
    missing columns (None) give nothing."""
    out: list[Any] = []
    for value in values:
        if value is None:
            continue
        out.extend(value if isinstance(value, list) else [value])
    return out


def split_name(value: Any) -> str | None:
    """A sample's split (``SPLIT_ALIASES`` applied), None when it names none; ``bad_split`` for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    name = SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower()) if isinstance(value, str) else value
    if name not in SPLITS:
        raise Invalid(WHAT_RECORD, "bad_split", f"split is {value!r}; expected one of {', '.join(SPLITS)}")
    return name


def image_field(value: Any, name: str) -> str | bytes | None:
    """An image column's value: a path, encoded bytes, or a Hugging Face ``Image`` struct ({bytes, path})."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        if text_problem(value):
            raise Invalid(WHAT_RECORD, "invalid_text", f"image path {text_problem(value)}")
        return value.strip() or None
    raise Invalid(WHAT_RECORD, "wrong_type", f"image {name!r} is a {type(value).__name__}: expected a path or bytes")


def classes_from_labels(labels: Iterable[Any], where: str) -> list[str]:
    """Class names when the source gives none: the distinct label names, sorted (ids follow that order). Integer
    labels cannot name classes: their names must come from ``--classes``."""
    names: set[str] = set()
    for label in labels:
        if isinstance(label, bool) or isinstance(label, (int, float)):
            raise UserError(
                f"{where}: labels are class ids ({label!r}) and no class names are given: pass --classes FILE "
                "(label_class_id_mapping.json-style {name: id}, or one name per line in id order)"
            )
        if isinstance(label, str) and label.strip():
            names.add(label.strip())
    if not names:
        raise UserError(f"{where}: no sample has a label")
    return sorted(names)


def record_from_row(
    row: dict[str, Any], cols: dict[str, tuple[str, ...]], where: str, split: str | None = None
) -> SourceRecord:
    """A row of named columns (a manifest's, a Hugging Face table's) as a ``SourceRecord``; ``cols`` from
    ``require_columns``, ``where`` names the row in messages, ``split`` serves when the row names none (a
    ``DatasetDict`` key, a Parquet file name)."""
    image = image_field(row.get(cols["image"][0]), cols["image"][0])
    mask = cols["mask"][0] if cols["mask"] else None
    return SourceRecord(
        image=image,
        image_name=image if isinstance(image, str) else f"{cols['image'][0]} of {where}",
        label=row.get(cols["label"][0]),
        rationales=rationale_list([row.get(c) for c in cols["rationale"]]),
        mask=mask_ref(row.get(mask), f"{mask} of {where}") if mask else None,
        split=(split_name(row.get(cols["split"][0])) if cols["split"] else None) or split_name(split),
    )
