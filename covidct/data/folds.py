"""Stratified, group-disjoint k-fold splits, deterministic from a split seed alone."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from covidct.data.sources import Sample
from covidct.errors import ConfigError

N_FOLDS = 4
FEW_IMAGES_PER_CLASS = 5  # below this in a part, a run and `data check` warn: its metrics are noisy or undefined


def assign_groups(samples: Sequence[Sample], n_parts: int, seed: int) -> list[int]:
    """Part index per sample: whole groups go to one part, each class spread evenly over the parts.

    Greedy: groups in a seeded random order, larger first, each to the part that currently holds the
    fewest images of the group's majority class (ties: fewest images overall).
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        members[s.group].append(i)
    groups = sorted(members)
    random.Random(seed).shuffle(groups)
    groups.sort(key=lambda g: -len(members[g]))
    per_class = [Counter() for _ in range(n_parts)]
    totals = [0] * n_parts
    part_of = [0] * len(samples)
    for g in groups:
        idx = members[g]
        label = Counter(samples[i].label for i in idx).most_common(1)[0][0]
        part = min(range(n_parts), key=lambda k: (per_class[k][label], totals[k], k))
        for i in idx:
            part_of[i] = part
            per_class[part][samples[i].label] += 1
        totals[part] += len(idx)
    return part_of


MAX_VAL_FRACTION = 0.5  # the validation part is one of k >= 2 parts of the training folds


def validation_parts(val_fraction: float) -> int:
    """k, where the validation part is one of k class-balanced, group-disjoint parts of the training folds: the
    nearest 1/k to data.val_fraction (0.1: 10, 0.25: 4; 0.3 gives 1/3, which a run's record notes)."""
    if not 0 < val_fraction <= MAX_VAL_FRACTION:
        raise ConfigError(f"data.val_fraction must be 0 or in (0, {MAX_VAL_FRACTION}], got {val_fraction}.")
    return round(1 / val_fraction)


def validation_rounding(val_fraction: float) -> str:
    """What a run says of a data.val_fraction that is no 1/k: the part it holds out instead ('' for 0 or 1/k)."""
    if val_fraction == 0:
        return ""
    parts = validation_parts(val_fraction)
    return "" if math.isclose(parts * val_fraction, 1) else f"one part in {parts}, {100 / parts:.0f}%"


def split_fold(samples: Sequence[Sample], fold: int, split_seed: int, val_fraction: float) -> dict[str, list[Sample]]:
    """train/val/test for one fold: test is fold `fold` of N_FOLDS; val is carved from the other folds."""
    if not 0 <= fold < N_FOLDS:
        raise ConfigError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}.")
    n_parts = validation_parts(val_fraction) if val_fraction != 0 else 0
    fold_of = assign_groups(samples, N_FOLDS, split_seed)
    test = [s for s, f in zip(samples, fold_of) if f == fold]
    rest = [s for s, f in zip(samples, fold_of) if f != fold]
    if val_fraction == 0:
        return {"train": rest, "val": [], "test": test}
    part_of = assign_groups(rest, n_parts, split_seed * 1000 + 7 * fold + 1)
    return {
        "train": [s for s, p in zip(rest, part_of) if p != 0],
        "val": [s for s, p in zip(rest, part_of) if p == 0],
        "test": test,
    }
