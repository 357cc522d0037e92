"""megl_ray.data.reader: the bundled sample's conversion cache."""

import shutil

import numpy as np

from megl_ray.data.reader import bundled_dataset_uri
from megl_ray.data.sample import SAMPLE_ENV, sample_dataset_path


def test_bundled_cache_is_keyed_by_mask_content_too(tmp_path, monkeypatch):
    # A regenerated sample may keep exp_annotation.json byte for byte and change only its masks (as when the masks
    # became digit regions): the cached conversion of the old masks must not be served for the new ones.
    src = tmp_path / "sample"
    shutil.copytree(sample_dataset_path(), src)
    monkeypatch.setenv(SAMPLE_ENV, str(src))
    cache = tmp_path / "cache"
    first = bundled_dataset_uri(cache)
    assert bundled_dataset_uri(cache) == first  # unchanged content: the same cached conversion
    mask = sorted((src / "masks").glob("*.npy"))[0]
    np.save(mask, 1.0 - np.load(mask))
    second = bundled_dataset_uri(cache)
    assert second != first
