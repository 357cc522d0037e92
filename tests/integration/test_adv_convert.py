"""Adversarial inputs to ``python -m megl_ray.data.convert``: each a user error (exit 2) or a counted rejection,
never a traceback, a hang, a partial or lost dataset, or a write outside DST."""

from __future__ import annotations

import pytest

from megl_ray.data import convert
from tests.support.adversarial import CONVERT, assert_user_error, good_record, make_source, run

# --------------------------------------------------------------------------------------- whole-run user errors


# ------------------------------------------------------------------------------------ record-level rejections


# case -> (record b's raw JSON or changes, extra file to create, expected (what, reason) of b)


@pytest.mark.slow
def test_atomic_overwrite_on_s3(embedded_s3, monkeypatch, tmp_path, capsys):
    """The same guarantees on an object store, where the swap moves objects one by one."""
    from megl_ray import storage

    for key, value in embedded_s3.env().items():
        monkeypatch.setenv(key, value)
    uri = "s3://megl-adversarial/ds"
    src = make_source(tmp_path / "src")
    assert run(CONVERT, convert.main, [src, uri], capsys).code == 0
    old = sorted(storage.list_files(uri))
    bad = make_source(tmp_path / "bad", {"a": good_record("a"), "b": good_record("b", class_id=9)})
    assert_user_error(run(CONVERT, convert.main, [bad, uri, "--overwrite", "--strict"], capsys), "unknown_class_id")
    assert sorted(storage.list_files(uri)) == old
    assert run(CONVERT, convert.main, [src, uri, "--overwrite"], capsys).code == 0
    assert sorted(storage.list_files(uri)) == old and not any(convert.STAGING_PREFIX in f for f in old)
    from megl_ray.data.schema import load_dataset_info

    assert sum(load_dataset_info(uri).splits.values()) == 2
