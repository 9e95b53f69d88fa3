"""A run's test results recomputed from its predictions: what every table of the report reads.

A record's metrics (metrics.json) are a cache of its predictions (predictions.csv): the report recomputes every
image- and patient-level metric, of every checkpoint selection and unseen-site norm choice, with the statistics of
`covidct.metrics` as they are now, and checks the cache against them. So a statistic added later has a value for
runs recorded before it existed, a patient pooling chosen at report time needs no training, and a metrics.json
edited by hand, or written by another version of a metric, is named instead of silently reported.

Pure functions, like table1.py: the CLI feeds them the records it read and names the file at fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from covidct.metrics import LEVELS, recomputed_test

# How far a cached value may lie from its recomputation: the same formula on the same (exactly written)
# probabilities, summed in another order at most.
TOLERANCE = 1e-9


def _site_metrics(test: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, {metric: value}) of every site of every level, selection and norm choice of a test section."""
    for selection, result in test.items():
        parts = [(f"test.{selection}", result)]
        parts += [(f"test.{selection}.unseen.{how}", r) for how, r in result.get("unseen", {}).items()]
        for where, part in parts:
            for level in LEVELS:
                for site, metrics in part.get(level, {}).items():
                    yield f"{where}.{level}.{site}", metrics


def cache_mismatches(cached: Mapping[str, Any], recomputed: Mapping[str, Any]) -> list[str]:
    """Where a record's metrics (`cached`, its test section) differ from their recomputation: a site one has and
    the other lacks, or a metric both hold with another value. A metric only the recomputation has is a
    statistic newer than the record, not a mismatch."""
    have, want = dict(_site_metrics(cached)), dict(_site_metrics(recomputed))
    problems = [f"{path} is recorded, but the predictions have no such part" for path in have if path not in want]
    problems += [f"{path} is not recorded, but the predictions have it" for path in want if path not in have]
    for path in have.keys() & want.keys():
        for name in have[path].keys() & want[path].keys():
            old, new = have[path][name], want[path][name]
            if (old is None) != (new is None) or (
                old is not None and not math.isclose(old, new, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
            ):
                problems.append(f"{path}.{name} is {old}, but its predictions give {new}")
    return sorted(problems)


def check_cache(record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The record's test section recomputed with the pooling it was recorded with; ValueError naming the first
    metric whose recorded value is not its predictions'."""
    recomputed = recomputed_test(record["test"], rows, record["run"].get("patient_pooling", "mean"))
    problems = cache_mismatches(record["test"], recomputed)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"its metrics are not its predictions': {problems[0]}{more}")
    return recomputed
