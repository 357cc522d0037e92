"""A Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder (a ``Dataset``: ``state.json``,
``dataset_info.json`` and Arrow files; or a ``DatasetDict``: ``dataset_dict.json`` and a folder per split), or
Parquet files as the Hub serves them (``<split>-00000-of-00001.parquet``, the features in their ``huggingface``
metadata).

Read with pyarrow, the format ``datasets`` writes, so that ``datasets`` need not be installed: Arrow files are
memory-mapped (any row is read without loading the others), Parquet one row group at a time. An ``Image`` column's
embedded bytes are the image; a ``ClassLabel`` column's names are the classes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megl_ray.data.schema import SPLITS
from megl_ray.data.sources.authors import load_classes
from megl_ray.data.sources.records import (
    DEFAULT_COLUMNS,
    SPLIT_ALIASES,
    ColumnMap,
    Source,
    SourceRecord,
    classes_from_labels,
    record_from_row,
    require_columns,
)
from megl_ray.errors import UserError


def is_hf_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


class HFSource(Source):
    """The Arrow tables of a ``save_to_disk`` folder (memory-mapped, one block) or the row groups of Parquet files
    (a block each), with the split a ``DatasetDict`` key or a Parquet file name gives."""

    form = "hf"

    def __init__(self, path: str, columns: ColumnMap, classes_file: str | None = None):
        self.root = path if os.path.isdir(path) else os.path.dirname(path)
        self.parts: list[tuple[str | None, Any]] = []  # (split or None, pa.Table | pq.ParquetFile)
        features: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = _json(os.path.join(path, "dataset_dict.json")).get("splits", [])
            for split in splits:
                features = self._add_saved(os.path.join(path, split), split) or features
        elif os.path.isfile(os.path.join(path, "state.json")):
            features = self._add_saved(path, None)
        else:
            files = (
                [path]
                if os.path.isfile(path)
                else sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            )
            if not files:
                raise UserError(f"{path}: no save_to_disk files (state.json, dataset_dict.json) and no .parquet files")
            for file in files:
                parquet = _opened(file, pq.ParquetFile)
                self.parts.append((_split_of_file(file), parquet))
                meta = (parquet.schema_arrow.metadata or {}).get(b"huggingface")
                features = features or (json.loads(meta).get("info", {}).get("features", {}) if meta else {})
        first = self.parts[0][1]
        names = first.schema_arrow.names if isinstance(first, pq.ParquetFile) else first.column_names
        defaults = ColumnMap(
            {
                **{k: v for k, v in _feature_columns(features).items() if k not in columns.columns},
                **columns.columns,
            }
        )
        self.cols = require_columns(defaults, names, path)
        self.features = features
        label = self.cols["label"][0]
        class_names = features.get(label, {}).get("names") if isinstance(features.get(label), dict) else None
        if classes_file:
            self.classes = load_classes(classes_file)
        elif class_names:
            self.classes = list(class_names)
        else:
            self.classes = classes_from_labels(self._column(label), path)
        self._cache: tuple[Any, pa.Table] | None = None

    def _add_saved(self, folder: str, split: str | None) -> dict[str, Any]:
        state = _json(os.path.join(folder, "state.json"))
        tables = [_opened(os.path.join(folder, f["filename"]), _arrow_table) for f in state.get("_data_files", [])]
        if not tables:
            raise UserError(f"{folder}/state.json lists no data files")
        self.parts.append((split, pa.concat_tables(tables)))
        info = os.path.join(folder, "dataset_info.json")
        return _json(info).get("features", {}) if os.path.isfile(info) else {}

    def _column(self, name: str) -> list[Any]:
        values: list[Any] = []
        for _, part in self.parts:
            table = part.read(columns=[name]) if isinstance(part, pq.ParquetFile) else part.select([name])
            values.extend(table.column(name).to_pylist())
        return values

    def blocks(self) -> list[list[tuple[str, Any]]]:
        blocks, whole = [], []
        for p, (_, part) in enumerate(self.parts):
            if isinstance(part, pq.ParquetFile):
                for g in range(part.num_row_groups):
                    ids = self._ids(part.read_row_group(g, columns=list(self.cols["id"])), p, g)
                    blocks.append([(rid, (p, g, i)) for i, rid in enumerate(ids)])
            else:
                whole.extend((rid, (p, None, i)) for i, rid in enumerate(self._ids(part, p, None)))
        return ([whole] if whole else []) + blocks

    def _ids(self, table: pa.Table, part: int, group: int | None) -> list[str]:
        if self.cols["id"]:
            return [str(v) for v in table.column(self.cols["id"][0]).to_pylist()]
        split = self.parts[part][0]
        prefix = f"{split}-" if split else ""
        where = f"{group}-" if group is not None else ""
        return [f"{prefix}{part}-{where}{i}" for i in range(table.num_rows)]

    def _row(self, locator: tuple[int, int | None, int]) -> dict[str, Any]:
        p, g, i = locator
        part = self.parts[p][1]
        if g is None:
            return part.slice(i, 1).to_pylist()[0]
        if self._cache is None or self._cache[0] != (p, g):
            self._cache = ((p, g), part.read_row_group(g))  # the blocks' order reads each row group once
        return self._cache[1].slice(i, 1).to_pylist()[0]

    def record(self, locator: Any) -> SourceRecord:
        return record_from_row(self._row(locator), self.cols, f"row {locator[2]}", self.parts[locator[0]][0])

    def describe(self) -> str:
        rows = sum(
            part.metadata.num_rows if isinstance(part, pq.ParquetFile) else part.num_rows for _, part in self.parts
        )
        return f"{rows} rows of {len(self.classes)} classes in the Hugging Face dataset {self.root}"


def _feature_columns(features: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The image and label columns the features name (the first ``Image`` and ``ClassLabel``), when the usual
    column names are not there."""
    found: dict[str, tuple[str, ...]] = {}
    for name, feature in features.items():
        kind = feature.get("_type") if isinstance(feature, dict) else None
        if kind == "Image" and "image" not in found and name not in DEFAULT_COLUMNS["mask"]:
            found["image"] = (name,)
        if kind == "ClassLabel" and "label" not in found:
            found["label"] = (name,)
    return found


def _split_of_file(path: str) -> str | None:
    """``train-00000-of-00002.parquet`` (or a ``train/`` folder) -> ``train``; ``validation`` -> ``val``."""
    for part in (os.path.basename(path).split("-")[0].split(".")[0], os.path.basename(os.path.dirname(path))):
        name = SPLIT_ALIASES.get(part, part)
        if name in SPLITS:
            return name
    return None


def _arrow_table(path: str) -> pa.Table:
    return pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()  # zero-copy over the mapping


def _opened(path: str, opener: Any) -> Any:
    """``opener(path)``, a file that is missing or not Arrow/Parquet being one ``UserError``."""
    try:
        return opener(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"cannot read {path} as a Hugging Face dataset file: {err}") from None


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value
