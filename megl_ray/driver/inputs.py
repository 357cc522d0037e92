"""What a training run reads: which ids train and which validate, and the Ray Datasets the trainer gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megl_ray.config import MEGLConfig
from megl_ray.data.pipeline import build_dataset
from megl_ray.data.reader import read_split
from megl_ray.data.splits import carve_validation
from megl_ray.errors import UserError
from megl_ray.model.vlm import pixel_size


@dataclass
class Splits:
    train_ids: list[str]
    corpus: list[str]
    """The training rows' rationales (the tiny preset trains its tokenizer on them)."""
    val_ids: list[str] | None
    """Ids carved from train to validate on; None: the dataset's own val split, or none (see ``val_source``)."""
    val_source: str
    """``split`` (the dataset's val split), ``carved`` (``data.val_fraction`` of train) or ``none``."""

    def summary(self, cfg: MEGLConfig) -> dict[str, Any]:
        return {
            "val_source": self.val_source,
            "val_fraction": cfg.data.val_fraction if self.val_source == "carved" else None,
        }


def plan_splits(cfg: MEGLConfig, info: Any, evaluate_test: bool) -> Splits:
    """Read train's ids, classes and rationales (no images) and decide what validates; user errors for empty
    splits, before Ray starts."""
    counts = dict(info.splits)
    described = ", ".join(f"{k}={v}" for k, v in counts.items())
    if counts.get("train", 0) == 0:
        raise UserError(
            f"dataset {cfg.data.uri} has no training images ({described}): convert it again with "
            "records in the train split"
        )
    if evaluate_test and counts.get("test", 0) == 0:
        raise UserError(
            f"dataset {cfg.data.uri} has no test images ({described}): convert it again with "
            "--test-fraction > 0 (or records in the test split)"
        )
    table = read_split(cfg.data.uri, "train", info, columns=["id", "class_id", "rationales"])
    ids = [str(i) for i in table.column("id").to_pylist()]
    rationales = dict(zip(ids, table.column("rationales").to_pylist()))
    if counts.get("val", 0) > 0:
        train_ids, val_ids, source = ids, None, "split"
    elif cfg.data.val_fraction > 0:
        train_ids, val_ids = carve_validation(
            ids, table.column("class_id").to_pylist(), cfg.data.val_fraction, cfg.train.seed
        )
        source = "carved" if val_ids else "none"
        val_ids = val_ids or None
    else:
        train_ids, val_ids, source = ids, None, "none"
    if (cfg.run.checkpoint_metric or "").startswith("val_") and source == "none":
        raise UserError(
            f"run.checkpoint_metric={cfg.run.checkpoint_metric} needs a validation split: dataset {cfg.data.uri} "
            f"has none ({described}) and data.val_fraction={cfg.data.val_fraction} carves none"
        )
    if len(train_ids) < cfg.train.num_workers:
        raise UserError(f"{len(train_ids)} training images cannot feed train.num_workers={cfg.train.num_workers}")
    corpus = [r for i in train_ids for r in rationales[i]]
    return Splits(train_ids, corpus, val_ids, source)


def build_datasets(
    cfg: MEGLConfig, info: Any, tokenizer: Any, splits: Splits, cache: bool, evaluate_test: bool
) -> tuple[dict, Any]:
    """(datasets for the TorchTrainer, cached training split or None). Training data is not among the trainer's
    datasets: each worker reads its own seeded share every epoch (``megl_ray.training.accounting``). ``val`` is
    read at each epoch's end and ``test`` once after the export; with ``cache`` both are materialised too, so a
    validation does not read and decode the split again."""
    common = dict(
        tokenizer=tokenizer,
        image_size=pixel_size(cfg.model),
        image_aspect=cfg.model.image_aspect,
        max_rationales=cfg.data.max_rationales,
        max_text_tokens=cfg.model.max_text_tokens,
        seed=cfg.train.seed,
        info=info,
    )
    split = dict(num_shards=cfg.train.num_workers, cache=cache, **common)
    datasets = {}
    if splits.val_source == "split":
        datasets["val"] = build_dataset(cfg.data.uri, "val", **split)
    elif splits.val_source == "carved":
        datasets["val"] = build_dataset(cfg.data.uri, "train", include_ids=splits.val_ids, **split)
    if evaluate_test:
        datasets["test"] = build_dataset(cfg.data.uri, "test", **split)
    train_cache = None
    if cache:
        train_cache = build_dataset(cfg.data.uri, "train", cache=True, include_ids=splits.train_ids, **common)
    return datasets, train_cache


def cached_rows(splits: Splits, info: Any, evaluate_test: bool) -> int:
    """Rows ``build_datasets`` materialises when it caches: the training split, validation's and test's."""
    counts = dict(info.splits)
    val = counts.get("val", 0) if splits.val_source == "split" else len(splits.val_ids or ())
    return len(splits.train_ids) + val + (counts.get("test", 0) if evaluate_test else 0)
