"""An image folder with a manifest: a CSV file (a header row, one sample per row) or a JSON Lines file (one object per
line). Paths in it are relative to the manifest's folder. Columns are found by their usual names or named with
``--map`` (``records.DEFAULT_COLUMNS``); a JSONL rationale or mask value may be a list or an object (COCO polygons or
RLE), a CSV cell holds text (a mask cell may hold that JSON).

The manifest's rows are read up front (text only: a 100,000-row manifest is a few tens of MB); images and masks are
read one record at a time by the converter.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from megl_ray.data import schema
from megl_ray.data.schema import WHAT_RECORD, Invalid
from megl_ray.data.sources.authors import MAPPING_FILE, load_classes
from megl_ray.data.sources.records import (
    ColumnMap,
    Source,
    SourceRecord,
    classes_from_labels,
    record_from_row,
    require_columns,
)
from megl_ray.errors import UserError

MANIFEST_SUFFIXES = (".csv", ".jsonl")
MANIFEST_LIMIT = 1024 * 1024 * 1024


class ManifestSource(Source):
    """A ``.csv`` or ``.jsonl`` manifest at ``path``."""

    form = "manifest"

    def __init__(self, path: str, columns: ColumnMap, classes_file: str | None = None):
        self.path, self.root = path, os.path.dirname(path)
        self.rows = _read_rows(path)
        keys: dict[str, None] = {}
        for row in self.rows[:1000]:  # JSONL keys may vary per line: the union of the first ones
            if isinstance(row, dict):
                keys.update(dict.fromkeys(row))
        self.cols = require_columns(columns, keys, path)
        label = self.cols["label"][0]
        if classes_file is None and os.path.isfile(os.path.join(self.root, MAPPING_FILE)):
            classes_file = os.path.join(self.root, MAPPING_FILE)
        self.classes = (
            load_classes(classes_file)
            if classes_file
            else classes_from_labels((r.get(label) for r in self.rows if isinstance(r, dict)), path)
        )

    def blocks(self) -> list[list[tuple[str, Any]]]:
        pairs = []
        for index, row in enumerate(self.rows):
            pairs.append((self._id(index, row), index))
        return [pairs]

    def _id(self, index: int, row: Any) -> str:
        if not isinstance(row, dict):
            return f"line{index + 1}"
        if self.cols["id"] and row.get(self.cols["id"][0]) not in (None, ""):
            return str(row[self.cols["id"][0]])
        image = row.get(self.cols["image"][0])
        return os.path.splitext(image)[0] if isinstance(image, str) and image.strip() else f"row{index + 1}"

    def record(self, locator: Any) -> SourceRecord:
        row = self.rows[locator]
        if isinstance(row, Invalid):
            raise row
        if not isinstance(row, dict):
            raise Invalid(WHAT_RECORD, "not_an_object", f"line {locator + 1} is a JSON {type(row).__name__}")
        return record_from_row(row, self.cols, f"row {locator + 1}")

    def describe(self) -> str:
        return f"{len(self.rows)} rows of {len(self.classes)} classes in the manifest {self.path}"


def _read_rows(path: str) -> list[Any]:
    """The manifest's rows: dicts, or for a JSONL line that does not parse, an ``Invalid`` kept in its place (the
    record is rejected with ``bad_json``; the others go on)."""
    try:
        size = os.path.getsize(path)
        if size > MANIFEST_LIMIT:
            raise UserError(f"{path}: {size} bytes is more than the {MANIFEST_LIMIT}-byte manifest limit")
        with open(path, encoding="utf-8", newline="") as f:
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise UserError(f"{path}: the CSV has no header row")
                return [{k: v for k, v in row.items() if k is not None} for row in reader]
            return [_json_line(line, number) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise UserError(f"{path}: {err}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _json_line(line: str, number: int) -> Any:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        return Invalid(WHAT_RECORD, "bad_json", f"line {number} is not valid JSON: {err}")
    if isinstance(value, dict):
        problem = next((schema.text_problem(k) for k in value if schema.text_problem(k)), None)
        if problem:
            return Invalid(WHAT_RECORD, "invalid_text", f"line {number}: a key {problem}")
    return value
