"""Which rows train and which validate, when a dataset has no validation split of its own (no Ray).

The MEGL authors' records carry ``train`` and ``test`` only; a validation set is then carved from train: seeded and
stratified by class, so every class keeps its share in both parts and the same seed gives the same carve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def carve_validation(
    ids: Sequence[str], class_ids: Sequence[int], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train ids, validation ids): ``round(fraction × n_c)`` ids of each class ``c`` with at least 2 images go to
    validation (at least one when the fraction is positive); the order of ``ids`` is kept in both lists."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for index, class_id in enumerate(class_ids):
        by_class.setdefault(int(class_id), []).append(index)
    rng = np.random.default_rng([seed, 13])
    held: set[int] = set()
    for class_id in sorted(by_class):
        members = by_class[class_id]
        take = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        held.update(members[i] for i in rng.permutation(len(members))[:take])
    train = [ids[i] for i in range(len(ids)) if i not in held]
    val = [ids[i] for i in range(len(ids)) if i in held]
    return train, val
