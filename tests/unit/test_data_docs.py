"""``docs/data.md`` says what the code does: every field, column, rejection reason, Parquet column and
``dataset.json`` field it lists is one the code accepts or writes — and none the code has is missing."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema

from megl_ray.data import schema
from megl_ray.data.dataset_info import DatasetInfo
from megl_ray.data.sources.records import DEFAULT_COLUMNS, FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def _table(heading: str) -> list[list[str]]:
    """The rows (cells, backticks stripped) of the first table after the line starting with ``heading``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([c.strip().replace("`", "") for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def _annotation_schema() -> dict:
    return json.loads(resources.files("megl_ray.data").joinpath("annotation.schema.json").read_text())


def test_every_authors_field_listed_is_in_the_json_schema_and_accepted_by_the_converter():
    rows = _table("### The MEGL authors' layout")
    listed = {r[0]: r[2] == "yes" for r in rows}
    record_schema = _annotation_schema()["$defs"]["record"]
    assert set(listed) == set(record_schema["properties"])
    assert {k for k, required in listed.items() if required} == set(record_schema["required"])
    record = {
        "image_path": "images/a.png",
        "class_id": 0,
        "ans": "cat",
        "exp": ["pointed ears"],
        "visual_exp": "masks/a.npy",
        "split": "train",
    }
    assert set(record) == set(listed)
    jsonschema.validate({"a": record}, _annotation_schema())
    assert schema.check_record_fields(record) == record  # the converter's own check takes every field
    for mask in ({"size": [4, 4], "counts": "04L4"}, [[0, 0, 3, 0, 3, 3]]):  # the other documented mask forms
        jsonschema.validate({"a": {**record, "visual_exp": mask}}, _annotation_schema())
        assert schema.check_record_fields({**record, "visual_exp": mask})["visual_exp"] == mask


def test_the_map_keys_and_default_column_names_are_the_codes():
    rows = _table("| key | default names |")
    assert [r[0] for r in rows] == list(FIELDS)
    for key, names, *_ in rows:
        assert tuple(n.strip() for n in names.split(",")) == DEFAULT_COLUMNS[key], key


def test_every_rejection_reason_is_documented_and_only_those():
    documented = {r[0]: r[1] for r in _table("| reason | about | meaning |")}
    codes = {
        **dict.fromkeys(schema.RECORD_REASONS, "record"),
        **dict.fromkeys(schema.MASK_REASONS, "mask"),
        **dict.fromkeys(schema.RATIONALE_REASONS, "rationale"),
    }
    assert documented == codes


def test_the_parquet_columns_and_dataset_json_fields_are_documented():
    columns = [r[0] for r in _table("| column | type | meaning |")]
    assert columns == schema.PARQUET_SCHEMA.names
    fields = [r[0] for r in _table("| field | meaning |")]
    assert fields == [f.name for f in dataclasses.fields(DatasetInfo)]


def test_the_doc_names_every_form_and_mask_kind():
    text = DOC.read_text()
    for form in ("--format authors", "--format manifest", "--format hf", "--format webdataset"):
        assert form in text
    assert re.search(r"COCO RLE", text) and re.search(r"COCO polygons", text) and "--mask-threshold" in text
