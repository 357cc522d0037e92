"""Converting a dataset — in the MEGL authors' layout, an image folder with a CSV/JSONL manifest, a Hugging Face
dataset or WebDataset shards (``megl_ray.data.sources``) — into validated Parquet shards plus ``dataset.json`` (the
library of ``python -m megl_ray.data.convert``, whose docstring says what SRC and DST hold; ``docs/data.md`` has
every form, field and rejection reason).

Everything is first written under a staging prefix inside DST and moved into place only once the conversion
succeeded: a failed or interrupted run leaves the previous dataset as it was. Every problem becomes one
``rejected.jsonl`` line with a stable ``reason`` code and is counted in the summary; the run goes on (``strict``
stops at the first one instead). Records stream through one at a time and shards are written as they fill, so memory
holds at most one shard's encoded bytes per split, never decoded images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megl_ray import storage
from megl_ray.config import safe_io
from megl_ray.data import schema
from megl_ray.data.destination import STAGING_PREFIX, Destination
from megl_ray.data.masks import decode_mask
from megl_ray.data.schema import SPLITS, Invalid
from megl_ray.data.sources import ANNOTATION_FILE, FORMATS, MAPPING_FILE, ColumnMap, Source, SourceRecord, open_source
from megl_ray.errors import UserError

log = logging.getLogger("megl_ray.data.convert")

__all__ = [
    "ANNOTATION_FILE",
    "MAPPING_FILE",
    "STAGING_PREFIX",
    "ConvertOptions",
    "assign_split",
    "convert",
    "ordered_records",
    "shuffled_records",
]

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how (the options of ``python -m megl_ray.data.convert``)."""

    src: str
    """The dataset: a folder in the MEGL authors' layout, a CSV/JSONL manifest, a Hugging Face dataset (save_to_disk
    folder or Parquet files) or WebDataset shards (a .tar or a folder of them)."""
    dst: str | None
    """Output: a local folder or ``s3://bucket/prefix`` (None only with ``dry_run``)."""
    format: str = "auto"
    """``authors``, ``manifest``, ``hf``, ``webdataset``, or ``auto`` (told from SRC when unambiguous)."""
    map: tuple[str, ...] = ()
    """``key=column`` pairs naming the columns of id, image, label, rationale (several allowed), mask and split."""
    classes: str | None = None
    """Class names: a ``{name: id}`` JSON file or one name per line in id order (default: the source's own)."""
    mask_threshold: float | None = None
    """Binarise image masks at this fraction of 255 (default: greyscale is a soft mask)."""
    dry_run: bool = False
    """Validate and report without writing anything."""
    mask_size: int = 64
    """Side of the stored uint8 masks."""
    prior_size: int = 8
    """Side of the spatial prior Ā in dataset.json."""
    val_fraction: float = 0.1
    """Fraction of unsplit images put in val."""
    test_fraction: float = 0.2
    """Fraction of unsplit images put in test."""
    rows_per_shard: int = 256
    seed: int = 0
    """Seed of the split hash."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width*height accepted, checked before decoding."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Largest image or mask file accepted, checked before reading."""
    strict: bool = False
    """Stop at the first problem instead of recording it."""
    overwrite: bool = False
    """Replace a dataset already at ``dst`` (only its own files)."""


def assign_split(record_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one image from a hash of (seed, id): the same id always lands in the same split."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


class _Rejections:
    """Writes ``rejected.jsonl`` as problems arrive and counts them; in strict mode the first problem stops the run."""

    def __init__(self, stream: Any, strict: bool):
        self.stream, self.strict = stream, strict
        self.by_reason: Counter[str] = Counter()
        self.by_what: Counter[str] = Counter()

    def add(self, record_id: str, problem: Invalid) -> None:
        entry = {"id": record_id, "what": problem.what, "reason": problem.reason, "detail": problem.detail}
        self.stream.write((json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        self.by_reason[problem.reason] += 1
        self.by_what[problem.what] += 1
        if self.strict:
            raise UserError(f"record {record_id!r}: {problem.what} rejected: {problem.reason}: {problem.detail}")


class _ShardWriter:
    """Buffers rows per split and writes ``<split>/part-NNNNN.parquet`` each time ``rows_per_shard`` fill up."""

    def __init__(self, fs: Any, base: str, rows_per_shard: int, mask_size: int):
        self.fs, self.base, self.rows_per_shard = fs, base, rows_per_shard
        self.arrow_schema = schema.parquet_schema(mask_size)
        self.buffers: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.shards: dict[str, list[str]] = {s: [] for s in SPLITS}

    def add(self, row: dict[str, Any]) -> None:
        buffer = self.buffers[row["split"]]
        buffer.append(row)
        if len(buffer) >= self.rows_per_shard:
            self._flush(row["split"])

    def close(self) -> None:
        for split in SPLITS:
            if self.buffers[split]:
                self._flush(split)

    def _flush(self, split: str) -> None:
        relative = f"{split}/part-{len(self.shards[split]):05d}.parquet"
        table = pa.Table.from_pylist(self.buffers[split], schema=self.arrow_schema)
        with self.fs.open_output_stream(f"{self.base}/{relative}") as stream:
            pq.write_table(table, stream, row_group_size=self.rows_per_shard)
        log.info("wrote %s (%d rows)", relative, table.num_rows)
        self.shards[split].append(relative)
        self.buffers[split] = []


class _NoShards:
    """The writer of a dry run: writes nothing (the converter counts the rows)."""

    def add(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Converter:
    """Validates and converts records one at a time, accumulating the summary counts and the train-mask prior."""

    def __init__(self, source: Source, args: ConvertOptions, rejections: _Rejections, writer: Any):
        self.source, self.classes, self.args = source, source.classes, args
        self.rejections, self.writer = rejections, writer
        self.seen: set[str] = set()
        self.rows_in = self.rows_written = self.rows_rejected = 0
        self.split_counts = {s: 0 for s in SPLITS}
        self.mask_counts = {s: 0 for s in SPLITS}
        self.class_counts = {s: {name: 0 for name in self.classes} for s in SPLITS}
        self.prior_sum = np.zeros((args.prior_size, args.prior_size), dtype=np.float64)
        self.prior_n = 0

    def process(self, record_id: str, locator: Any) -> None:
        """Convert one (id, locator) pair of the source: write its row, or record why not."""
        self.rows_in += 1
        try:
            row, soft_problems, prior = self._validate(record_id, locator)
        except Invalid as problem:
            self.rows_rejected += 1
            self.rejections.add(record_id, problem)
            return
        finally:
            self.seen.add(record_id)
        # Mask and rationale problems are only reported for records that are written, so each record's
        # rejected.jsonl lines tell one consistent story.
        for problem in soft_problems:
            self.rejections.add(record_id, problem)
        self.writer.add(row)
        split = row["split"]
        self.rows_written += 1
        self.split_counts[split] += 1
        self.class_counts[split][row["class_name"]] += 1
        if row["has_mask"]:
            self.mask_counts[split] += 1
            if split == "train":
                self.prior_sum += prior
                self.prior_n += 1

    def _validate(self, record_id: str, locator: Any) -> tuple[dict[str, Any], list[Invalid], np.ndarray | None]:
        if record_id in self.seen:
            raise Invalid(
                schema.WHAT_RECORD, "duplicate_id", "id appears earlier in the source; only its first entry is used"
            )
        if not record_id.strip():
            raise Invalid(schema.WHAT_RECORD, "wrong_type", "record id is empty")
        if schema.text_problem(record_id):
            raise Invalid(schema.WHAT_RECORD, "invalid_text", f"record id {schema.text_problem(record_id)}")
        record = self.source.record(locator)
        class_id, class_name = schema.resolve_label(record.label, record.label_name, self.classes)
        rationales, soft = schema.clean_rationales(record.rationales)
        if not rationales:
            reasons = ", ".join(p.reason for p in soft) or "no rationale given"
            raise Invalid(schema.WHAT_RECORD, "no_usable_rationale", f"no non-blank text rationale ({reasons})")
        data = self._image(record)
        fmt, width, height = schema.check_image_bytes(data, self.args.max_pixels)

        mask_bytes, prior = None, None
        if record.mask is not None:
            try:
                raw = decode_mask(
                    record.mask, self.source.root, self.args.max_bytes, self.args.mask_threshold, height, width
                )
                mask = schema.check_mask(raw, height, width)
                mask_bytes = schema.mask_to_bytes(mask, self.args.mask_size)
                prior = schema.prior_term(mask, self.args.prior_size)
            except Invalid as problem:
                soft.insert(0, problem)
                mask_bytes, prior = None, None

        split = record.split or assign_split(record_id, self.args.seed, self.args.val_fraction, self.args.test_fraction)
        row = {
            "id": record_id,
            "image": data,
            "image_format": fmt,
            "width": width,
            "height": height,
            "class_id": class_id,
            "class_name": class_name,
            "has_mask": mask_bytes is not None,
            "mask": mask_bytes,
            "rationales": rationales,
            "split": split,
        }
        return row, soft, prior

    def _image(self, record: SourceRecord) -> bytes:
        """The encoded image: read from under the source root, or as the source holds it (bounded either way)."""
        if record.image is None:
            raise Invalid(schema.WHAT_RECORD, "image_missing", f"{record.image_name}: the sample has no image")
        if isinstance(record.image, bytes):
            if len(record.image) > self.args.max_bytes:
                raise Invalid(
                    schema.WHAT_RECORD,
                    "image_too_large",
                    f"{record.image_name} is {len(record.image)} bytes > --max-bytes {self.args.max_bytes}",
                )
            return record.image
        path = schema.resolve_inside(self.source.root, record.image)
        return schema.read_source_file(path, record.image, self.args.max_bytes, schema.WHAT_RECORD)

    def prior(self) -> list[list[float]]:
        if self.prior_n == 0:
            log.warning("no train image has a mask: dataset.json gets a uniform prior")
            size = self.args.prior_size
            return np.full((size, size), 1.0 / (size * size)).tolist()
        return (self.prior_sum / self.prior_n).tolist()


def _check_args(args: ConvertOptions) -> None:
    for name in ("mask_size", "prior_size", "rows_per_shard", "max_pixels", "max_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.val_fraction + args.test_fraction > 1.0:
        raise UserError("--val-fraction + --test-fraction must not exceed 1")
    if args.mask_threshold is not None and not 0.0 < args.mask_threshold <= 1.0:
        raise UserError("--mask-threshold must be in (0, 1]")
    if args.format not in ("auto", *FORMATS):
        raise UserError(f"--format {args.format!r}: expected auto or one of {', '.join(FORMATS)}")
    if args.dst is None and not args.dry_run:
        raise UserError("DST is required (only --dry-run goes without one)")


def shuffled_records(records: Any, seed: int) -> list[tuple[str, Any]]:
    """The (id, record) pairs in a seeded random order, so that every shard mixes the classes even when the
    annotation file is sorted by class (training streams shards in order; a class-sorted shard gives single-class
    batches). A repeated id keeps its first entry: later copies come after all first entries."""
    pairs = list(records)
    first: dict[str, int] = {}
    for index, (record_id, _) in enumerate(pairs):
        first.setdefault(record_id, index)
    firsts = sorted(first.values())
    kept = set(firsts)
    later = [i for i in range(len(pairs)) if i not in kept]
    order = [firsts[i] for i in np.random.default_rng([seed, 17]).permutation(len(firsts))] + later
    return [pairs[i] for i in order]


def ordered_records(blocks: list[list[tuple[str, Any]]], seed: int) -> list[tuple[str, Any]]:
    """The order a source's records are converted in: one block (a folder, a manifest, a memory-mapped table) in
    ``shuffled_records`` order; several (Parquet row groups, tar shards: read whole or not at all) block by block
    in a seeded order, each shuffled within, so that no block is read twice."""
    if len(blocks) == 1:
        return shuffled_records(blocks[0], seed)
    rng = np.random.default_rng([seed, 18])
    return [pair for b in rng.permutation(len(blocks)) for pair in shuffled_records(blocks[b], seed + int(b))]


def convert(args: ConvertOptions) -> dict[str, Any]:
    """Run one conversion with parsed arguments; return the summary dict (with ``dry_run``, the report of what a
    conversion would write)."""
    started = time.monotonic()
    _check_args(args)
    source = open_source(os.path.abspath(args.src), args.format, ColumnMap.parse(args.map), args.classes)
    log.info("reading %s", source.describe())
    if args.dry_run:
        summary = _convert_into(None, "", source, args)
        summary.update(dst=args.dst, dry_run=True, seconds=round(time.monotonic() - started, 3))
        return summary
    if storage.is_s3(args.dst):
        storage.ensure_bucket(args.dst)
    elif safe_io.overlaps(source.root, args.dst):
        raise UserError(
            f"destination {args.dst!r} is, contains or lies inside the source folder {source.root!r}: "
            "the source must stay untouched"
        )
    fs, base = storage.pyarrow_filesystem(args.dst)
    base = base.rstrip("/")
    try:
        destination = Destination(fs, base, args.dst, args.overwrite)
    except OSError as err:  # a file in the way, no permission, unreachable S3: the user's to fix
        raise UserError(f"cannot write to {args.dst}: {err}") from None
    log.info("converting to %s", args.dst)
    try:
        summary = _convert_into(fs, destination.staging, source, args)
        destination.commit()
    except BaseException:
        destination.abort()
        raise
    summary.update(dst=args.dst, seconds=round(time.monotonic() - started, 3))
    log.info("done: %d written, %d rejected", summary["rows_written"], summary["rows_rejected"])
    return summary


def _convert_into(fs: Any, base: str, source: Source, args: ConvertOptions) -> dict[str, Any]:
    """Convert every record into ``base`` (the staging prefix; ``fs`` None: a dry run, nothing written); return the
    summary counts."""
    writer = _NoShards() if fs is None else _ShardWriter(fs, base, args.rows_per_shard, args.mask_size)
    pairs = ordered_records(source.blocks(), args.seed)
    stream = io.BytesIO() if fs is None else fs.open_output_stream(f"{base}/{schema.REJECTED_FILE}")
    with stream:
        rejections = _Rejections(stream, args.strict)
        converter = _Converter(source, args, rejections, writer)
        for index, (record_id, locator) in enumerate(pairs):
            converter.process(record_id, locator)
            if (index + 1) % 1000 == 0:
                log.info("%d/%d records", index + 1, len(pairs))
        writer.close()

    coverage = {s: (converter.mask_counts[s] / n if n else 0.0) for s, n in converter.split_counts.items()}
    if fs is not None:
        info = schema.DatasetInfo(
            classes=source.classes,
            counts=converter.class_counts,
            mask_coverage=coverage,
            splits=dict(converter.split_counts),
            mask_size=args.mask_size,
            prior_size=args.prior_size,
            prior=converter.prior(),
            shards=writer.shards,
            source=source.root,
            convert_options={
                k: getattr(args, k)
                for k in ("mask_size", "prior_size", "val_fraction", "test_fraction", "seed", "max_pixels")
            },
        )
        info.validate()
        with fs.open_output_stream(f"{base}/{schema.DATASET_INFO_FILE}") as out:
            out.write(info.to_json().encode("utf-8"))

    if converter.rows_in != converter.rows_written + converter.rows_rejected:  # nothing may vanish silently
        raise RuntimeError(
            f"bug: {converter.rows_in} records in, {converter.rows_written} written, {converter.rows_rejected} rejected"
        )
    return {
        "format": source.form,
        "rows_in": converter.rows_in,
        "rows_written": converter.rows_written,
        "rows_rejected": converter.rows_rejected,
        "splits": dict(converter.split_counts),
        "with_mask": sum(converter.mask_counts.values()),
        "mask_coverage": {s: round(v, 4) for s, v in coverage.items()},
        "class_counts": converter.class_counts,
        "rejected_by_reason": dict(sorted(rejections.by_reason.items())),
        "masks_rejected": rejections.by_what[schema.WHAT_MASK],
        "rationales_dropped": rejections.by_what[schema.WHAT_RATIONALE],
    }
