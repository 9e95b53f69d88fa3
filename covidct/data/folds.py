"""Stratified, group-disjoint k-fold splits, deterministic from a split seed alone."""

from __future__ import annotations

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


def split_fold(samples: Sequence[Sample], fold: int, split_seed: int, val_fraction: float) -> dict[str, list[Sample]]:
    """train/val/test for one fold: test is fold `fold` of N_FOLDS; val is carved from the other folds."""
    if not 0 <= fold < N_FOLDS:
        raise ConfigError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}.")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    fold_of = assign_groups(samples, N_FOLDS, split_seed)
    test = [s for s, f in zip(samples, fold_of) if f == fold]
    rest = [s for s, f in zip(samples, fold_of) if f != fold]
    if val_fraction == 0:
        return {"train": rest, "val": [], "test": test}
    n_parts = max(2, round(1 / val_fraction))
    part_of = assign_groups(rest, n_parts, split_seed * 1000 + 7 * fold + 1)
    return {
        "train": [s for s, p in zip(rest, part_of) if p != 0],
        "val": [s for s, p in zip(rest, part_of) if p == 0],
        "test": test,
    }
