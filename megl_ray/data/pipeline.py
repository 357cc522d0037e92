"""Ray Data pipeline: converted Parquet shards (local or ``s3://``) → preprocessed batches for Ray Train workers.

    read_parquet (pyarrow filesystem from ``megl_ray.storage``)
      → pad to a multiple of the worker count with weight-0 copies (equal shards, nothing dropped)
      → shard files in an order seeded per epoch (streaming: no all-to-all barrier)
      → map_batches(preprocess_rows): decode + resize images, decode masks, tokenise every rationale
      → training: each worker reads its own share of the epoch (``include_ids``, ``megl_ray.training.accounting``);
        validation: Ray Train splits it per worker (``get_dataset_shard``; ``streaming_split(n, equal=True)``)
      → ``iter_epoch``: local shuffle seeded by (seed, epoch, rank): reproducible, different every epoch;
        one rationale drawn per image per epoch

Equal shards matter: a worker that runs out of batches early leaves its peers blocked in the gradient all-reduce.
Padding (rather than ``equal=True`` dropping rows) keeps every row, and the copies carry ``sample_weight`` 0 so they
change no gradient. This is the only data module that imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import FileShuffleConfig
from ray.data.expressions import col

from megl_ray.cluster.credentials import workers_inherit_env
from megl_ray.data.reader import split_paths
from megl_ray.data.schema import DatasetInfo, load_dataset_info
from megl_ray.data.transforms import model_batch, preprocess_rows
from megl_ray.storage.retrying_fs import retrying

# Each worker's read also retries these (on top of pyarrow's own S3 retries): a restarting S3-compatible server
# answers with connection errors for a few seconds.
RETRIED_IO_ERRORS = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "Connection refused",
    "connection reset",
    "Timeout was reached",
    "Couldn't connect to server",
)


def _with_weight(table: pa.Table, weight: float) -> pa.Table:
    return table.append_column("weight", pa.array(np.full(table.num_rows, weight, dtype=np.float32)))


def configure_data_context() -> None:
    """Retries of transient storage errors, and a deterministic order: with ``preserve_order`` the same seed and
    epoch give the same batches, which reproducible runs and exact mid-epoch resumption need."""
    ctx = ray.data.DataContext.get_current()
    ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *RETRIED_IO_ERRORS]))
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # per-operator bars flood the logs of a job; our trainer reports progress
    # Ray Data's V2 Parquet reader starts up to 32 FooterReader actors (each a new Python process) for every
    # execution of a read — every epoch's shard and every validation: on 2 cores the default run started ~30
    # worker processes a minute and trained at a third of its speed. Our splits are a few small files; V1 reads
    # their footers in the reading task.
    ctx.use_datasource_v2 = False


def build_dataset(
    uri: str,
    split: str,
    *,
    tokenizer: Any,
    image_size: int,
    max_rationales: int,
    max_text_tokens: int,
    num_shards: int = 1,
    seed: int = 0,
    info: DatasetInfo | None = None,
    exclude_ids: Sequence[str] = (),
    include_ids: Sequence[str] | None = None,
    pad_to: int | None = None,
    preprocess_batch_size: int = 128,
    cpus_per_task: float = 0.25,
    cache: bool = False,
    image_aspect: str = "squash",
) -> ray.data.Dataset:
    """The preprocessed split as a Ray Dataset whose row count is a multiple of ``num_shards``, images decoded at
    ``image_size`` (the model's ``pixel_size``) with ``image_aspect`` (``model.image_aspect``).

    ``exclude_ids`` drops rows already trained on in the current epoch; ``include_ids`` keeps only those rows and
    ``pad_to`` pads to exactly that many rows (a resumed run gives each worker its share of the rest of an epoch).
    ``cpus_per_task`` is a scheduling share, not a limit: decoding and tokenising are light and I/O-bound, and a
    fraction lets several read/preprocess tasks overlap beside the training workers.
    ``cache`` materialises the preprocessed split in Ray's object store (preprocessing is epoch-independent by
    design), so later epochs skip S3, decoding and tokenising; use it when the split fits (``fits_in_cache``), and
    take each epoch's share of it with ``cached_share``. ``seed`` orders the files: pass one per epoch
    (``accounting.epoch_seed``) for a different order every epoch that a resumed run reproduces.
    """
    configure_data_context()
    info = info or load_dataset_info(uri)

    # Ray pickles the filesystem into its read tasks: no credentials inside when those inherit them
    fs, paths = split_paths(uri, info, split, embed_credentials=not workers_inherit_env())
    fs = retrying(fs)
    if not paths:
        raise ValueError(f"split '{split}' of {uri} is empty")
    # Files in a seeded order, not randomize_block_order (an all-to-all barrier: it would read the whole split
    # before the first batch leaves). The order is fixed by the seed alone, not by how many times this process
    # has executed the dataset, so a resumed run sees what the original would have.
    ds = ray.data.read_parquet(
        paths, filesystem=fs, num_cpus=cpus_per_task, shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=False)
    )
    rows = info.splits.get(split, 0)
    # Expressions, not Python lambdas: evaluated by Arrow on whole blocks (and no "use expr" warning on the console)
    if exclude_ids:
        excluded = sorted(set(exclude_ids))
        ds = ds.filter(expr=col("id").not_in(excluded))
        rows -= len(excluded)
    if include_ids is not None:
        included = sorted(set(include_ids))
        ds = ds.filter(expr=col("id").is_in(included))
        rows = len(included)
    pad = (pad_to - rows) if pad_to is not None else (-rows) % num_shards
    if pad < 0:
        raise ValueError(f"pad_to={pad_to} is smaller than the {rows} rows selected")
    real = ds.map_batches(_with_weight, fn_kwargs={"weight": 1.0}, batch_format="pyarrow")
    if pad:
        padding = ds.limit(pad).map_batches(_with_weight, fn_kwargs={"weight": 0.0}, batch_format="pyarrow")
        real = real.union(padding)
    # Tasks, not an actor pool: Ray keeps its worker processes (and their imports) between epochs, whereas an
    # actor pool is started again for every epoch's execution, which costs seconds per epoch on a small dataset.
    ds = real.map_batches(
        preprocess_rows,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            image_size=image_size,
            mask_size=info.mask_size,
            max_rationales=max_rationales,
            max_text_tokens=max_text_tokens,
            aspect=image_aspect,
        ),
        batch_size=preprocess_batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_task,
    )
    if cache:
        ds = ds.materialize()  # block order: reseeded per epoch by ``cached_share``
    return ds


def _select(batch: dict[str, np.ndarray], ids: frozenset, weight: float | None = None) -> dict[str, np.ndarray]:
    keep = np.fromiter((str(i) in ids for i in batch["id"]), dtype=bool, count=len(batch["id"]))
    out = {k: v[keep] for k, v in batch.items()}
    if weight is not None:
        out["weight"] = np.full(int(keep.sum()), weight, dtype=np.float32)
    return out


def cached_share(cached: ray.data.Dataset, include_ids: Sequence[str], pad_to: int, seed: int) -> ray.data.Dataset:
    """A worker's share of a cached (``build_dataset(cache=True)``) split: its blocks in an order seeded by
    ``seed`` (references only: cheap), the rows of ``include_ids``, padded to ``pad_to`` rows with weight-0 copies."""
    ids = frozenset(str(i) for i in include_ids)
    if pad_to < len(ids):
        raise ValueError(f"pad_to={pad_to} is smaller than the {len(ids)} rows selected")
    ds = cached.randomize_block_order(seed=seed)
    share = ds.map_batches(_select, fn_kwargs={"ids": ids}, batch_format="numpy", num_cpus=0.25)
    if pad_to > len(ids):
        padding = ds.map_batches(
            _select, fn_kwargs={"ids": ids, "weight": 0.0}, batch_format="numpy", num_cpus=0.25
        ).limit(pad_to - len(ids))
        share = share.union(padding)
    return share


def preprocessed_bytes_per_row(image_size: int, mask_size: int, max_rationales: int, max_text_tokens: int) -> int:
    """Bytes one preprocessed row takes in the object store (uint8 pixels and mask, int32 token ids)."""
    return 3 * image_size**2 + mask_size**2 + 4 * max_rationales * max_text_tokens + 64


def fits_in_cache(rows: int, bytes_per_row: int, fraction: float = 0.25) -> bool:
    """Whether ``rows`` preprocessed rows fit in ``fraction`` of the cluster's object store."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    return rows * bytes_per_row <= fraction * store


def iter_epoch(
    shard: Any,
    *,
    epoch: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    shuffle_buffer: int = 256,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of numpy batches from a worker's shard (``ray.train.get_dataset_shard``) or any Ray Dataset.

    The local shuffle is seeded by (seed, epoch, rank): reproducible, and different every epoch."""
    kwargs: dict[str, Any] = dict(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=4)
    if shuffle_buffer > 0:
        kwargs.update(
            local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=(seed * 1_000_003 + epoch) * 1009 + rank
        )
    yield from shard.iter_batches(**kwargs)


def iter_model_batches(
    shard: Any,
    *,
    tokenizer: Any,
    template: str,
    num_image_tokens: int,
    epoch: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    shuffle_buffer: int = 256,
    with_ids: bool = False,
):
    """``iter_epoch`` turned into the model's batch dicts (torch tensors), one rationale drawn per image; with
    ``with_ids``, (ids of the real rows, batch) pairs."""
    for pre in iter_epoch(
        shard, epoch=epoch, batch_size=batch_size, seed=seed, rank=rank, shuffle_buffer=shuffle_buffer
    ):
        batch = model_batch(pre, tokenizer, template, num_image_tokens, epoch, seed)
        if with_ids:
            yield [str(i) for i, w in zip(pre["id"], pre["weight"]) if w > 0], batch
        else:
            yield batch
