"""Converting a dataset in the MEGL authors' layout into validated Parquet shards plus ``dataset.json`` (the library of
``python -m megl_ray.data.convert``, whose docstring says what SRC and DST hold).

Everything is first written under a staging prefix inside DST and moved into place only once the conversion
succeeded: a failed or interrupted run leaves the previous dataset as it was. Every problem becomes one
``rejected.jsonl`` line with a stable ``reason`` code and is counted in the summary; the run goes on (``strict``
stops at the first one instead). Records stream through one at a time and shards are written as they fill, so memory
holds at most one shard's encoded bytes per split, never decoded images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector, FileType

from megl_ray import storage
from megl_ray.config import safe_io
from megl_ray.data import schema
from megl_ray.data.schema import SPLITS, Invalid, JsonObject
from megl_ray.errors import UserError

log = logging.getLogger("megl_ray.data.convert")

ANNOTATION_FILE = "exp_annotation.json"
MAPPING_FILE = "label_class_id_mapping.json"
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
ANNOTATION_LIMIT = 4 * 1024 * 1024 * 1024
STAGING_PREFIX = ".megl-staging-"
OWNED = (schema.DATASET_INFO_FILE, schema.REJECTED_FILE, *SPLITS)
"""What a conversion writes at DST, in the order an overwrite deletes it (dataset.json first: no longer valid)."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how (the options of ``python -m megl_ray.data.convert``)."""

    src: str
    """Folder in the MEGL layout: exp_annotation.json, label_class_id_mapping.json and the images/masks they name."""
    dst: str
    """Output: a local folder or ``s3://bucket/prefix``."""
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


def _read_json(path: str) -> Any:
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
    """Read ``label_class_id_mapping.json`` (name -> id) into the list of names indexed by id (ids 0..n-1)."""
    raw = _read_json(path)
    if not isinstance(raw, JsonObject) or not raw:
        raise UserError(f"{path}: must be a non-empty JSON object mapping class name to class id")
    by_id: dict[int, str] = {}
    seen: set[str] = set()
    for name, cid in raw:
        if name in seen:
            raise UserError(f"{path}: class name {name!r} is given more than once")
        problem = schema.text_problem(name) or (
            f"contains {schema.IMAGE_TOKEN!r}" if schema.IMAGE_TOKEN in name else None if name.strip() else "is blank"
        )
        if problem:
            raise UserError(f"{path}: class name {name!r} {problem}")
        seen.add(name)
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise UserError(f"{path}: class {name!r} has id {cid!r}; ids must be integers")
        if cid in by_id:
            raise UserError(f"{path}: class id {cid} is used by both {by_id[cid]!r} and {name!r}")
        by_id[cid] = name
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{path}: class ids must be exactly 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return [by_id[i] for i in range(len(by_id))]


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


class _Converter:
    """Validates and converts records one at a time, accumulating the summary counts and the train-mask prior."""

    def __init__(
        self, src: str, classes: list[str], args: ConvertOptions, rejections: _Rejections, writer: _ShardWriter
    ):
        self.src, self.classes, self.args = src, classes, args
        self.rejections, self.writer = rejections, writer
        self.seen: set[str] = set()
        self.rows_in = self.rows_written = self.rows_rejected = 0
        self.split_counts = {s: 0 for s in SPLITS}
        self.mask_counts = {s: 0 for s in SPLITS}
        self.class_counts = {s: {name: 0 for name in classes} for s in SPLITS}
        self.prior_sum = np.zeros((args.prior_size, args.prior_size), dtype=np.float64)
        self.prior_n = 0

    def process(self, record_id: str, raw: Any) -> None:
        """Convert one (id, record) pair: write its row, or record why not."""
        self.rows_in += 1
        try:
            row, soft_problems, prior = self._validate(record_id, raw)
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

    def _validate(self, record_id: str, raw: Any) -> tuple[dict[str, Any], list[Invalid], np.ndarray | None]:
        if record_id in self.seen:
            raise Invalid(
                schema.WHAT_RECORD, "duplicate_id", "id appears earlier in the file; only its first entry is used"
            )
        if not record_id.strip():
            raise Invalid(schema.WHAT_RECORD, "wrong_type", "record id is empty")
        if schema.text_problem(record_id):
            raise Invalid(schema.WHAT_RECORD, "invalid_text", f"record id {schema.text_problem(record_id)}")
        fields = schema.check_record_fields(raw)
        schema.check_class(fields["class_id"], fields["ans"], self.classes)
        rationales, soft = schema.clean_rationales(fields["exp"])
        if not rationales:
            reasons = ", ".join(p.reason for p in soft) or "exp is empty"
            raise Invalid(schema.WHAT_RECORD, "no_usable_rationale", f"no non-blank text rationale ({reasons})")
        image_path = schema.resolve_inside(self.src, fields["image_path"])
        data = schema.read_source_file(image_path, fields["image_path"], self.args.max_bytes, schema.WHAT_RECORD)
        fmt, width, height = schema.check_image_bytes(data, self.args.max_pixels)

        mask_bytes, prior = None, None
        visual = fields.get("visual_exp") or ""
        if visual.strip():
            try:
                mask_path = schema.resolve_inside(self.src, visual, schema.WHAT_MASK)
                raw_mask = schema.read_source_file(mask_path, visual, self.args.max_bytes, schema.WHAT_MASK)
                mask = schema.check_mask(schema.load_mask(raw_mask, visual), height, width)
                mask_bytes = schema.mask_to_bytes(mask, self.args.mask_size)
                prior = schema.prior_term(mask, self.args.prior_size)
            except Invalid as problem:
                soft.insert(0, problem)
                mask_bytes, prior = None, None

        split = fields.get("split") or assign_split(
            record_id, self.args.seed, self.args.val_fraction, self.args.test_fraction
        )
        row = {
            "id": record_id,
            "image": data,
            "image_format": fmt,
            "width": width,
            "height": height,
            "class_id": fields["class_id"],
            "class_name": fields["ans"],
            "has_mask": mask_bytes is not None,
            "mask": mask_bytes,
            "rationales": rationales,
            "split": split,
        }
        return row, soft, prior

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


class _Destination:
    """DST checked before anything is written, a staging prefix inside it, and the swap once the conversion
    succeeded (``commit``) or the clean-up when it did not (``abort``)."""

    def __init__(self, fs: Any, base: str, dst: str, overwrite: bool):
        self.fs, self.base, self.dst = fs, base, dst
        info = fs.get_file_info(base)
        if info.type not in (FileType.NotFound, FileType.Directory):
            raise UserError(f"cannot write to {dst}: it exists and is not a folder")
        self.created = info.type == FileType.NotFound
        names = [] if self.created else [i.base_name for i in fs.get_file_info(FileSelector(base))]
        names = [n for n in names if not n.startswith(STAGING_PREFIX)]  # another run's staging is not ours to judge
        self.existing = [n for n in OWNED if n in names]
        foreign = sorted(set(names) - set(OWNED))
        if foreign and schema.DATASET_INFO_FILE not in names:
            raise UserError(
                f"{dst} is not empty and holds no converted dataset ({', '.join(foreign[:3])}...); "
                "refusing to write into it: choose an empty or new destination"
            )
        if self.existing and not overwrite:
            raise UserError(
                f"{dst} already holds a dataset ({', '.join(self.existing)}); use an empty destination or --overwrite"
            )
        self.staging = f"{base}/{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        fs.create_dir(self.staging, recursive=True)
        for split in SPLITS:
            fs.create_dir(f"{self.staging}/{split}", recursive=True)

    def commit(self) -> None:
        """Replace the old dataset's own files by the new ones; ``dataset.json`` goes first and comes back last."""
        for name in self.existing:
            path = f"{self.base}/{name}"
            (self.fs.delete_dir if self.fs.get_file_info(path).type == FileType.Directory else self.fs.delete_file)(
                path
            )
        files = [
            i.path for i in self.fs.get_file_info(FileSelector(self.staging, recursive=True)) if i.type == FileType.File
        ]
        info_file = f"{self.staging}/{schema.DATASET_INFO_FILE}"
        for split in SPLITS:
            self.fs.create_dir(f"{self.base}/{split}", recursive=True)
        for path in sorted(files, key=lambda p: p == info_file):  # file by file: object stores cannot move folders
            self.fs.move(path, self.base + path[len(self.staging) :])
        self.fs.delete_dir(self.staging)

    def abort(self) -> None:
        """Remove the staging prefix (and DST itself when this run created it), leaving DST as it was."""
        for path in (self.staging, self.base) if self.created else (self.staging,):
            try:
                self.fs.delete_dir(path)
            except OSError as err:
                log.warning("could not clean up %s: %s", path, err)


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


def convert(args: ConvertOptions) -> dict[str, Any]:
    """Run one conversion with parsed arguments; return the summary dict."""
    started = time.monotonic()
    _check_args(args)
    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        raise UserError(f"source folder {args.src!r} does not exist or is not a folder")
    classes = load_classes(os.path.join(src, MAPPING_FILE))
    records = _read_json(os.path.join(src, ANNOTATION_FILE))
    if not isinstance(records, JsonObject):
        raise UserError(f"{os.path.join(src, ANNOTATION_FILE)}: must be a JSON object mapping id to record")

    if storage.is_s3(args.dst):
        storage.ensure_bucket(args.dst)
    elif safe_io.overlaps(src, args.dst):
        raise UserError(
            f"destination {args.dst!r} is, contains or lies inside the source folder {args.src!r}: "
            "the source must stay untouched"
        )
    fs, base = storage.pyarrow_filesystem(args.dst)
    base = base.rstrip("/")
    try:
        destination = _Destination(fs, base, args.dst, args.overwrite)
    except OSError as err:  # a file in the way, no permission, unreachable S3: the user's to fix
        raise UserError(f"cannot write to {args.dst}: {err}") from None
    log.info("converting %d records of %d classes from %s to %s", len(records), len(classes), src, args.dst)
    try:
        summary = _convert_into(fs, destination.staging, src, classes, records, args)
        destination.commit()
    except BaseException:
        destination.abort()
        raise
    summary.update(dst=args.dst, seconds=round(time.monotonic() - started, 3))
    log.info("done: %d written, %d rejected", summary["rows_written"], summary["rows_rejected"])
    return summary


def _convert_into(
    fs: Any, base: str, src: str, classes: list[str], records: JsonObject, args: ConvertOptions
) -> dict[str, Any]:
    """Convert every record into ``base`` (the staging prefix); return the summary counts."""
    writer = _ShardWriter(fs, base, args.rows_per_shard, args.mask_size)
    with fs.open_output_stream(f"{base}/{schema.REJECTED_FILE}") as stream:
        rejections = _Rejections(stream, args.strict)
        converter = _Converter(src, classes, args, rejections, writer)
        for index, (record_id, raw) in enumerate(shuffled_records(records, args.seed)):
            converter.process(record_id, raw)
            if (index + 1) % 1000 == 0:
                log.info("%d/%d records", index + 1, len(records))
        writer.close()

    info = schema.DatasetInfo(
        classes=classes,
        counts=converter.class_counts,
        mask_coverage={s: (converter.mask_counts[s] / n if n else 0.0) for s, n in converter.split_counts.items()},
        splits=dict(converter.split_counts),
        mask_size=args.mask_size,
        prior_size=args.prior_size,
        prior=converter.prior(),
        shards=writer.shards,
        source=src,
        convert_options={
            k: getattr(args, k)
            for k in ("mask_size", "prior_size", "val_fraction", "test_fraction", "seed", "max_pixels")
        },
    )
    info.validate()
    with fs.open_output_stream(f"{base}/{schema.DATASET_INFO_FILE}") as stream:
        stream.write(info.to_json().encode("utf-8"))

    if converter.rows_in != converter.rows_written + converter.rows_rejected:  # nothing may vanish silently
        raise RuntimeError(
            f"bug: {converter.rows_in} records in, {converter.rows_written} written, {converter.rows_rejected} rejected"
        )
    return {
        "rows_in": converter.rows_in,
        "rows_written": converter.rows_written,
        "rows_rejected": converter.rows_rejected,
        "splits": dict(converter.split_counts),
        "with_mask": sum(converter.mask_counts.values()),
        "rejected_by_reason": dict(sorted(rejections.by_reason.items())),
        "masks_rejected": rejections.by_what[schema.WHAT_MASK],
        "rationales_dropped": rejections.by_what[schema.WHAT_RATIONALE],
    }
