"""The carved validation split: seeded, stratified by class, disjoint from train."""

from collections import Counter

from megl_ray.data.splits import carve_validation


def test_each_class_keeps_its_share_and_the_carve_is_seeded():
    ids = [f"{c}-{i}" for c in range(10) for i in range(20)] + ["lonely"]
    classes = [c for c in range(10) for _ in range(20)] + [10]
    train, val = carve_validation(ids, classes, 0.1, seed=0)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert Counter(v.split("-")[0] for v in val) == {str(c): 2 for c in range(10)}  # the lone image stays in train
    assert (train, val) == carve_validation(ids, classes, 0.1, seed=0)
    assert val != carve_validation(ids, classes, 0.1, seed=1)[1]
    assert carve_validation(ids, classes, 0.0, seed=0) == (ids, [])
