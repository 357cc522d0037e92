"""Reading a converted dataset without Ray: one process, local or ``s3://`` (small splits, tests, the single-process
reference trainer). The Ray Data pipeline (``pipeline.py``) streams the same shards with the same row transform."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from megl_ray.data.conversion import ConvertOptions, convert
from megl_ray.data.sample import sample_dataset_path
from megl_ray.data.schema import DATASET_INFO_FILE, PARQUET_SCHEMA, DatasetInfo, load_dataset_info
from megl_ray.errors import UserError
from megl_ray.storage import pyarrow_filesystem


def split_paths(uri: str, info: DatasetInfo, split: str, embed_credentials: bool = True) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, shard paths) of one split; ``embed_credentials`` as in ``storage.pyarrow_filesystem``
    (False for a filesystem that Ray ships to its workers)."""
    if split not in info.shards:
        raise UserError(f"dataset at {uri} has no split '{split}' (it has {', '.join(info.shards)})")
    fs, base = pyarrow_filesystem(uri, embed_credentials=embed_credentials)
    return fs, [f"{base.rstrip('/')}/{rel}" for rel in info.shards[split]]


def read_split(uri: str, split: str, info: DatasetInfo | None = None, columns: list[str] | None = None) -> pa.Table:
    """The whole split as one Arrow table (rows in shard order); ``columns`` limits what is read (e.g. no images)."""
    info = info or load_dataset_info(uri)
    fs, paths = split_paths(uri, info, split)
    if not paths:
        return pa.table({})
    try:
        dataset = pads.dataset(paths, filesystem=fs, format="parquet")
        check_shard_schema(dataset.schema, uri, split)
        return dataset.to_table(columns=columns)
    except FileNotFoundError as err:
        raise UserError(f"dataset at {uri}: a shard of split '{split}' is missing ({_first_line(err)})") from None
    except (pa.ArrowInvalid, OSError) as err:  # truncated or overwritten shard, not Parquet at all
        raise UserError(f"dataset at {uri}: cannot read split '{split}': {_first_line(err)}") from None


def check_shard_schema(found: pa.Schema, uri: str, split: str) -> None:
    """Refuse shards whose columns are not the converter's (a foreign Parquet file under a dataset's name)."""
    for want in PARQUET_SCHEMA:
        index = found.get_field_index(want.name)
        if index < 0 or not found.field(index).type.equals(want.type):
            got = "missing" if index < 0 else str(found.field(index).type)
            raise UserError(f"dataset at {uri}: split '{split}' column '{want.name}' is {got}, expected {want.type}")


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def epoch_order(num_rows: int, epoch: int, seed: int) -> np.ndarray:
    """A permutation of the rows that differs between epochs and is the same on every machine."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def iter_row_batches(
    table: pa.Table, batch_size: int, epoch: int, seed: int, shuffle: bool = True, drop_last: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """Row dicts in batches of ``batch_size``, in the epoch's seeded order."""
    order = epoch_order(table.num_rows, epoch, seed) if shuffle else np.arange(table.num_rows)
    end = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, end, batch_size):
        yield table.take(order[start : start + batch_size]).to_pylist()


def bundled_dataset_uri(cache_dir: str | Path | None = None) -> str:
    """The bundled sample dataset converted (once, cached by the sample's content hash) to a local directory."""
    src = sample_dataset_path()
    # The masks are part of the key: a regenerated sample can keep its annotation file and change only its masks.
    content = hashlib.sha256((src / "exp_annotation.json").read_bytes())
    for mask in sorted((src / "masks").glob("*.npy")):
        content.update(mask.name.encode() + mask.read_bytes())
    digest = content.hexdigest()[:12]
    root = Path(cache_dir or Path.home() / ".cache" / "megl_ray" / "datasets") / f"digits-{digest}"
    if not (root / DATASET_INFO_FILE).is_file():
        # Convert beside the target and rename: concurrent callers (two workers, two tests) never see half a dataset.
        staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        convert(ConvertOptions(str(src), str(staging), overwrite=True))
        if root.exists() and not (root / DATASET_INFO_FILE).is_file():
            shutil.rmtree(root, ignore_errors=True)  # left by an interrupted run
        try:
            os.replace(staging, root)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(root)
