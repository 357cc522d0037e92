"""The MEGL authors' layout: ``exp_annotation.json`` (records keyed by id), ``label_class_id_mapping.json`` (class
name -> id) and the images and masks they name, relative to the folder. The record's fields are described by the
JSON Schema shipped beside this package (``megl_ray/data/annotation.schema.json``) and in ``docs/data.md``."""

from __future__ import annotations

import json
import os
from typing import Any

from megl_ray.config import safe_io
from megl_ray.data import schema
from megl_ray.data.masks import IMAGE_SUFFIXES, MaskRef, mask_ref
from megl_ray.data.schema import JsonObject
from megl_ray.data.sources.records import Source, SourceRecord
from megl_ray.errors import UserError

ANNOTATION_FILE = "exp_annotation.json"
MAPPING_FILE = "label_class_id_mapping.json"
ANNOTATION_LIMIT = 4 * 1024 * 1024 * 1024


def read_json(path: str) -> Any:
    """A JSON file parsed with ``schema.parse_json`` (objects as ``JsonObject``); problems are one ``UserError``."""
    try:
        text = safe_io.read_text(path, ANNOTATION_LIMIT, "annotation file")
    except safe_io.FileProblem as problem:
        if problem.kind == "missing":
            raise UserError(
                f"{path}: file not found (the source folder must hold {ANNOTATION_FILE} and {MAPPING_FILE})"
            ) from None
        raise UserError(problem.detail) from None
    try:
        return schema.parse_json(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}:{err.colno}: {err.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to parse") from None


def load_classes(path: str) -> list[str]:
    """Class names indexed by id, from ``label_class_id_mapping.json`` ({name: id}, ids exactly 0..n-1) or, for a
    file not ending in ``.json``, one name per line in id order (``--classes``)."""
    if not path.endswith(".json"):
        try:
            lines = safe_io.read_text(path, ANNOTATION_LIMIT, "class list").splitlines()
        except safe_io.FileProblem as problem:
            raise UserError(problem.detail) from None
        return _checked_names(path, [line.strip() for line in lines if line.strip()])
    raw = read_json(path)
    if not isinstance(raw, JsonObject) or not raw:
        raise UserError(f"{path}: must be a non-empty JSON object mapping class name to class id")
    by_id: dict[int, str] = {}
    for name, cid in raw:
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise UserError(f"{path}: class {name!r} has id {cid!r}; ids must be integers")
        if cid in by_id:
            raise UserError(f"{path}: class id {cid} is used by both {by_id[cid]!r} and {name!r}")
        by_id[cid] = name
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{path}: class ids must be exactly 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return _checked_names(path, [by_id[i] for i in range(len(by_id))])


def _checked_names(path: str, names: list[str]) -> list[str]:
    if not names:
        raise UserError(f"{path}: names no class")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"{path}: class name {name!r} is given more than once")
        problem = schema.text_problem(name) or (
            f"contains {schema.IMAGE_TOKEN!r}" if schema.IMAGE_TOKEN in name else None if name.strip() else "is blank"
        )
        if problem:
            raise UserError(f"{path}: class name {name!r} {problem}")
        seen.add(name)
    return names


class AuthorsSource(Source):
    """``exp_annotation.json`` + ``label_class_id_mapping.json`` in ``root`` (``classes_file`` overrides the
    mapping)."""

    form = "authors"

    def __init__(self, root: str, classes_file: str | None = None):
        self.root = root
        self.classes = load_classes(classes_file or os.path.join(root, MAPPING_FILE))
        path = os.path.join(root, ANNOTATION_FILE)
        records = read_json(path)
        if not isinstance(records, JsonObject):
            raise UserError(f"{path}: must be a JSON object mapping id to record")
        self.records = records

    def blocks(self) -> list[list[tuple[str, Any]]]:
        return [list(self.records)]  # (id, raw record): the record is its own locator

    def record(self, locator: Any) -> SourceRecord:
        fields = schema.check_record_fields(locator)
        visual = fields.get("visual_exp")
        return SourceRecord(
            image=fields["image_path"],
            image_name=fields["image_path"],
            label=fields["class_id"],
            label_name=fields["ans"],
            rationales=fields["exp"],
            mask=_visual_exp(visual),
            split=fields.get("split"),
        )

    def describe(self) -> str:
        return f"{len(self.records)} records of {len(self.classes)} classes in the authors' layout at {self.root}"


def _visual_exp(value: Any) -> MaskRef | None:
    """``visual_exp``: a path (``.npy``, or an image by its suffix; any other suffix is read as ``.npy``, as it
    always was), a COCO RLE object or COCO polygons."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if os.path.splitext(text)[1].lower() in IMAGE_SUFFIXES:
            return MaskRef("image", path=text, name=text)
        return MaskRef("npy", path=text, name=text)
    if isinstance(value, JsonObject):
        value = dict(value)
    return mask_ref(value, "visual_exp")
