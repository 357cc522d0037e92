"""What a run trains and validates on, decided before Ray starts."""

from types import SimpleNamespace

import pytest

from megl_ray.config import load_config, packaged_config
from megl_ray.data.reader import bundled_dataset_uri
from megl_ray.data.schema import load_dataset_info
from megl_ray.driver.inputs import plan_splits
from megl_ray.errors import UserError


def _cfg(*overrides):
    return load_config(packaged_config("tiny"), [f"data.uri={bundled_dataset_uri()}", *overrides])


def test_empty_train_or_test_splits_are_one_clear_line():
    with pytest.raises(UserError, match="has no training images"):
        plan_splits(_cfg(), SimpleNamespace(splits={"train": 0, "val": 3, "test": 3}), evaluate_test=True)
    with pytest.raises(UserError, match="has no test images .*--test-fraction"):
        plan_splits(_cfg(), SimpleNamespace(splits={"train": 3, "val": 0, "test": 0}), evaluate_test=True)


def test_a_val_split_is_used_else_one_is_carved_or_none():
    info = load_dataset_info(bundled_dataset_uri())
    assert plan_splits(_cfg(), info, True).val_source == "split"
    no_val = SimpleNamespace(**{**vars(info), "splits": {**info.splits, "val": 0}})
    carved = plan_splits(_cfg(), no_val, True)
    assert carved.val_source == "carved" and not set(carved.val_ids) & set(carved.train_ids)
    assert len(carved.val_ids) + len(carved.train_ids) == info.splits["train"]
    none = plan_splits(_cfg("data.val_fraction=0"), no_val, True)
    assert none.val_source == "none" and none.val_ids is None and len(none.train_ids) == info.splits["train"]
