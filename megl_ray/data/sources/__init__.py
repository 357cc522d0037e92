"""The input forms ``convert`` reads, and how the form of a SRC is told when ``--format`` is not given."""

from __future__ import annotations

import glob
import os

from megl_ray.data.sources.authors import ANNOTATION_FILE, MAPPING_FILE, AuthorsSource, load_classes, read_json
from megl_ray.data.sources.hf import HFSource, is_hf_folder
from megl_ray.data.sources.manifest import MANIFEST_SUFFIXES, ManifestSource
from megl_ray.data.sources.records import FIELDS, ColumnMap, Source, SourceRecord
from megl_ray.data.sources.webdataset import WebDatasetSource, shard_files
from megl_ray.errors import UserError

__all__ = [
    "ANNOTATION_FILE",
    "FIELDS",
    "FORMATS",
    "MAPPING_FILE",
    "ColumnMap",
    "Source",
    "SourceRecord",
    "detect_format",
    "load_classes",
    "open_source",
    "read_json",
]

FORMATS = ("authors", "manifest", "hf", "webdataset")


def _manifests(folder: str) -> list[str]:
    return sorted(p for suffix in MANIFEST_SUFFIXES for p in glob.glob(os.path.join(folder, f"*{suffix}")))


def detect_format(src: str) -> tuple[str, str]:
    """(form, path) of ``src``: a folder is the authors' layout if it holds ``exp_annotation.json``, a Hugging Face
    dataset if it holds ``state.json``/``dataset_dict.json``; otherwise a Hugging Face dataset if it holds Parquet
    files, WebDataset if it holds ``.tar`` shards, a manifest if it holds one ``.csv``/``.jsonl``; a file by its
    suffix. Anything else — or two of these
    at once — is a ``UserError`` asking for ``--format``."""
    if os.path.isfile(src):
        lower = src.lower()
        for form, suffixes in (("manifest", MANIFEST_SUFFIXES), ("hf", (".parquet",)), ("webdataset", (".tar",))):
            if lower.endswith(suffixes):
                return form, src
        raise UserError(f"{src}: cannot tell its format from the name; use --format {'|'.join(FORMATS)}")
    if not os.path.isdir(src):
        raise UserError(f"source {src!r} does not exist")
    # A file only one form writes (exp_annotation.json, state.json) decides, whatever else lies beside it.
    marked = [
        form
        for form, mark in (("authors", os.path.lexists(os.path.join(src, ANNOTATION_FILE))), ("hf", is_hf_folder(src)))
        if mark
    ]
    if len(marked) == 1:
        return marked[0], src
    found = [(form, src) for form in marked]
    if not marked and glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True):
        found.append(("hf", src))
    if shard_files(src):
        found.append(("webdataset", src))
    manifests = _manifests(src)
    if len(manifests) == 1:
        found.append(("manifest", manifests[0]))
    if len(found) == 1:
        return found[0]
    what = ", ".join(f"{form} ({path})" for form, path in found) or (
        f"several manifests ({', '.join(os.path.basename(m) for m in manifests)})" if manifests else "nothing known"
    )
    raise UserError(
        f"{src}: the format is ambiguous or unknown: found {what}; name it with --format {'|'.join(FORMATS)} "
        "(and, for a manifest, give the file itself as SRC)"
    )


def open_source(src: str, form: str = "auto", columns: ColumnMap | None = None, classes: str | None = None) -> Source:
    """The ``Source`` reading ``src`` in ``form`` (``auto``: ``detect_format``)."""
    columns = columns or ColumnMap({})
    if form == "auto":
        form, src = detect_format(src)
    elif form == "manifest" and os.path.isdir(src):
        manifests = _manifests(src)
        if len(manifests) != 1:
            raise UserError(f"{src}: expected one .csv or .jsonl manifest, found {len(manifests)}: give the file")
        src = manifests[0]
    if not os.path.exists(src):
        raise UserError(f"source {src!r} does not exist")
    if form == "authors":
        if not os.path.isdir(src):
            raise UserError(f"source folder {src!r} does not exist or is not a folder")
        if columns.columns:
            raise UserError("--map applies to manifests, Hugging Face datasets and WebDataset, not the authors' layout")
        return AuthorsSource(src, classes)
    if form == "manifest":
        return ManifestSource(src, columns, classes)
    if form == "hf":
        return HFSource(src, columns, classes)
    if form == "webdataset":
        return WebDatasetSource(src, columns, classes)
    raise UserError(f"--format {form!r}: expected auto or one of {', '.join(FORMATS)}")
