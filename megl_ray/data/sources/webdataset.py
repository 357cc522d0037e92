"""WebDataset shards: tar files whose members are grouped into samples by key (``dir/0001.jpg``, ``dir/0001.json``,
``dir/0001.mask.png`` are one sample, key ``dir/0001``: WebDataset's own rule, the name up to the first dot).

A sample has an image member (``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``, ``tif``/``tiff``, or the extension
``--map image=<ext>`` names) and a ``json`` member with its label, rationale(s), split and id, found under the usual
keys or the ones ``--map`` names; WebDataset's ``cls`` (label) and ``txt`` (rationale) members serve when the JSON
lacks them. A mask is a ``mask.npy``/``mask.png``/``mask.jpg`` member, or an RLE / polygons under the JSON's mask key.

Each shard is indexed once (member headers and the small JSON members only), then samples are read by seeking to
their members: images are never all in memory, and each shard is one block of the conversion's order.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Any

from megl_ray.data.masks import MaskRef, mask_ref
from megl_ray.data.schema import WHAT_RECORD, Invalid
from megl_ray.data.sources.authors import load_classes
from megl_ray.data.sources.records import (
    DEFAULT_COLUMNS,
    ColumnMap,
    Source,
    SourceRecord,
    classes_from_labels,
    rationale_list,
    split_name,
)
from megl_ray.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
MASK_EXTENSIONS = {"mask.npy": "npy", "mask.png": "image", "mask.jpg": "image", "mask.jpeg": "image"}
JSON_LIMIT = 16 * 1024 * 1024


def shard_files(path: str) -> list[str]:
    """The ``.tar`` shards at ``path`` (a file, or a folder's, sorted)."""
    return [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.tar")))


class WebDatasetSource(Source):
    """The samples of every shard, indexed by (shard, key)."""

    form = "webdataset"

    def __init__(self, path: str, columns: ColumnMap, classes_file: str | None = None):
        self.root = path if os.path.isdir(path) else os.path.dirname(path)
        self.shards = shard_files(path)
        if not self.shards:
            raise UserError(f"{path}: no .tar shards")
        self.columns = columns
        self.image_ext = columns.columns.get("image", ())
        self.index: list[dict[str, dict[str, tarfile.TarInfo]]] = []
        self.meta: dict[tuple[int, str], Any] = {}
        self._open: tuple[int, tarfile.TarFile] | None = None
        labels = []
        for number, shard in enumerate(self.shards):
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, base = os.path.split(member.name)
                        stem, dot, ext = base.partition(".")
                        if dot:
                            samples.setdefault(os.path.join(folder, stem), {})[ext.lower()] = member
                    for key, members in samples.items():
                        meta = self._json(tar, members)
                        self.meta[(number, key)] = meta
                        labels.append(self._label(tar, members, meta))
            except (tarfile.TarError, OSError) as err:
                raise UserError(f"cannot read the shard {shard}: {err}") from None
            self.index.append(samples)
        self.classes = load_classes(classes_file) if classes_file else classes_from_labels(labels, path)

    def _field(self, meta: Any, key: str) -> Any:
        if not isinstance(meta, dict):
            return None
        names = self.columns.columns.get(key) or DEFAULT_COLUMNS[key]
        if key == "rationale":
            return rationale_list([meta.get(n) for n in names])
        return next((meta[n] for n in names if n in meta), None)

    def _json(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> Any:
        member = members.get("json")
        if member is None:
            return {}
        if member.size > JSON_LIMIT:
            return Invalid(WHAT_RECORD, "bad_json", f"{member.name} is {member.size} bytes")
        try:
            return json.loads(tar.extractfile(member).read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            return Invalid(WHAT_RECORD, "bad_json", f"{member.name} is not valid JSON: {err}")

    def _label(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], meta: Any) -> Any:
        label = self._field(meta, "label")
        if label is None and "cls" in members:
            label = _text(tar, members["cls"])
        return label

    def blocks(self) -> list[list[tuple[str, Any]]]:
        blocks = []
        for number, samples in enumerate(self.index):
            block = []
            for key in samples:
                meta = self.meta[(number, key)]
                rid = self._field(meta, "id")
                block.append((str(rid) if rid not in (None, "") else key, (number, key)))
            blocks.append(block)
        return blocks

    def _tar(self, number: int) -> tarfile.TarFile:
        if self._open is None or self._open[0] != number:
            if self._open is not None:
                self._open[1].close()
            self._open = (number, tarfile.open(self.shards[number], "r:"))
        return self._open[1]

    def record(self, locator: Any) -> SourceRecord:
        number, key = locator
        members, meta = self.index[number][key], self.meta[locator]
        if isinstance(meta, Invalid):
            raise meta
        if not isinstance(meta, dict):
            raise Invalid(WHAT_RECORD, "not_an_object", f"{key}.json is a JSON {type(meta).__name__}")
        tar = self._tar(number)
        image_ext = next((e for e in (self.image_ext or IMAGE_EXTENSIONS) if e in members), None)
        image = tar.extractfile(members[image_ext]).read() if image_ext else None
        rationales = self._field(meta, "rationale")
        if not rationales and "txt" in members:
            rationales = [_text(tar, members["txt"])]
        return SourceRecord(
            image=image,
            image_name=f"{key}.{image_ext}" if image_ext else f"{key} (no image member)",
            label=self._label(tar, members, meta),
            rationales=rationales,
            mask=self._mask(tar, members, meta, key),
            split=split_name(self._field(meta, "split")),
        )

    def _mask(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], meta: dict, key: str) -> Any:
        ext = next((e for e in MASK_EXTENSIONS if e in members), None)
        if ext is not None:
            return MaskRef(MASK_EXTENSIONS[ext], data=tar.extractfile(members[ext]).read(), name=f"{key}.{ext}")
        return mask_ref(self._field(meta, "mask"), f"mask of {key}")

    def describe(self) -> str:
        return f"{len(self.meta)} samples of {len(self.classes)} classes in {len(self.shards)} WebDataset shard(s)"


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return tar.extractfile(member).read(JSON_LIMIT).decode("utf-8", errors="replace").strip()
