"""Uncertainty of the pooled test predictions: bootstrap confidence intervals, DeLong's paired AUC test and
reliability (calibration) bins. Pure functions of prediction rows, like the tables.

Prediction rows are those of `predictions.csv` with the run's experiment, fold and seed added. Pooled over
a method's runs, each seed's four folds test every image once.

Written here rather than taken from a library where none does the job: scipy.stats.bootstrap draws the
resamples and forms the intervals, but the weighted AUC that lets it evaluate a whole batch of cluster
resamples at once is ours; DeLong's test is in no maintained Python package (scipy, statsmodels), so it
follows Sun & Xu (2014), checked in the tests against the O(n^2) definition of DeLong et al. (1988).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from covidct.metrics import DECISION_THRESHOLD, ECE_BINS, patient_of, pool_by_patient

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed, so a report regenerated from the same records is byte-identical
INTERVAL_METRICS = ("auc", "acc")
INTERVAL_COLUMNS = (
    "selection",
    "experiment",
    "site",
    "level",
    "metric",
    "estimate",
    "low",
    "high",
    "unit",
    "n_units",
    "n_predictions",
)
DELONG_COLUMNS = (
    "selection",
    "site",
    "level",
    "reference",
    "baseline",
    "seed",
    "n_cases",
    "auc_reference",
    "auc_baseline",
    "diff",
    "z",
    "p",
)


def weighted_metric(metric: str, weights: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUC or accuracy of predictions counted `weights` times, for each row of a (B, n) weight matrix.

    AUC is the Mann-Whitney probability that a positive outranks a negative (ties count half), as
    torchmetrics' binary_auroc; accuracy predicts COVID above DECISION_THRESHOLD as the run metrics do.
    """
    weights = np.atleast_2d(weights).astype(np.float64)
    if metric == "acc":
        correct = ((probs > DECISION_THRESHOLD).astype(int) == labels).astype(np.float64)
        return (weights * correct).sum(-1) / weights.sum(-1)
    if metric != "auc":
        raise ValueError(f"no weighted form of {metric!r}")
    order = np.argsort(probs, kind="stable")
    p, y, w = probs[order], labels[order], weights[:, order]
    w_pos, w_neg = w * (y == 1), w * (y == 0)
    cum_neg = np.cumsum(w_neg, axis=-1)
    starts = np.searchsorted(p, p, side="left")  # first and last position of each prediction's tie group
    ends = np.searchsorted(p, p, side="right") - 1
    below = np.where(starts > 0, cum_neg[:, np.maximum(starts - 1, 0)], 0.0)
    tied = cum_neg[:, ends] - below
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w_pos * (below + 0.5 * tied)).sum(-1) / (w_pos.sum(-1) * w_neg.sum(-1))


def bootstrap_interval(
    metric: str,
    units: Sequence[str],
    labels: Sequence[int],
    probs: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float] | None:
    """(estimate, low, high) of a metric: a percentile bootstrap that resamples whole units (patients or
    images) with all their predictions, stratified by class (COVID units and non-COVID units resampled
    separately, as pROC does), so every resample has both classes. None where a class is missing."""
    labels_a, probs_a = np.asarray(labels, dtype=int), np.asarray(probs, dtype=np.float64)
    index = {unit: k for k, unit in enumerate(dict.fromkeys(units))}  # units in order of first appearance
    unit_of, n_units = np.array([index[u] for u in units]), len(index)
    unit_label = np.zeros(n_units, dtype=int)
    np.maximum.at(unit_label, unit_of, labels_a)
    strata = (np.flatnonzero(unit_label == 1), np.flatnonzero(unit_label == 0))
    if min(len(stratum) for stratum in strata) < 2:
        return None

    def statistic(covid: np.ndarray, non_covid: np.ndarray, axis: int = -1) -> np.ndarray:
        sample = np.concatenate([np.atleast_2d(covid), np.atleast_2d(non_covid)], axis=-1)
        offsets = np.arange(len(sample))[:, None] * n_units
        counts = np.bincount((sample + offsets).ravel(), minlength=len(sample) * n_units).reshape(-1, n_units)
        return weighted_metric(metric, counts[:, unit_of], labels_a, probs_a)

    estimate = float(weighted_metric(metric, np.ones(len(labels_a)), labels_a, probs_a)[0])
    result = stats.bootstrap(
        strata,
        statistic,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        paired=False,
        batch=max(1, 2_000_000 // max(1, len(labels_a))),
        rng=np.random.default_rng(seed),
    )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def confidence_intervals(
    rows: Sequence[Mapping[str, Any]], experiments: Sequence[str], patient_sites: Sequence[str], pooling: str
) -> list[dict[str, Any]]:
    """95% intervals of AUC and accuracy per method and site, on the predictions pooled over its runs.

    Image level: resampling unit the patient where a site has patient ids (a patient's slices move
    together), else the image. Patient level (sites with ids): one pooled prediction per patient and run.
    """
    out = []
    sites = sorted({r["site"] for r in rows})
    for experiment in experiments:
        for site in sites:
            mine = [r for r in rows if r["experiment"] == experiment and r["site"] == site]
            if not mine:
                continue
            by_patient = site in patient_sites
            levels = [("images", mine, [patient_of(r) if by_patient else r["file"] for r in mine])]
            if by_patient:
                pooled = [
                    p
                    for run in sorted({(r["fold"], r["seed"]) for r in mine})
                    for p in pool_by_patient([r for r in mine if (r["fold"], r["seed"]) == run], pooling)
                ]
                levels.append(("patients", pooled, [p["patient"] for p in pooled]))
            for level, items, units in levels:
                for metric in INTERVAL_METRICS:
                    labels = [int(r["label"]) for r in items]
                    interval = bootstrap_interval(metric, units, labels, [float(r["prob_covid"]) for r in items])
                    estimate, low, high = (None, None, None) if interval is None else interval
                    out.append(
                        {
                            "experiment": experiment,
                            "site": site,
                            "level": level,
                            "metric": metric,
                            "estimate": _pct(estimate),
                            "low": _pct(low),
                            "high": _pct(high),
                            "unit": "patient" if by_patient else "image",
                            "n_units": len(set(units)),
                            "n_predictions": len(items),
                        }
                    )
    return out


def _pct(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * value


def delong_test(labels: Sequence[int], probs_a: Sequence[float], probs_b: Sequence[float]) -> dict[str, float]:
    """DeLong's test of two correlated AUCs on the same cases (fast form of Sun & Xu 2014, midranks)."""
    labels_a = np.asarray(labels, dtype=int)
    scores = np.vstack([np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)])
    positives, negatives = scores[:, labels_a == 1], scores[:, labels_a == 0]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two positive and two negative cases")
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    rank_all = stats.rankdata(np.hstack([positives, negatives]), axis=1)
    aucs = rank_all[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v_pos = (rank_all[:, :m] - rank_pos) / n  # each positive's share of negatives it outranks
    v_neg = 1.0 - (rank_all[:, m:] - rank_neg) / m  # each negative's share of positives that outrank it
    covariance = np.cov(v_pos) / m + np.cov(v_neg) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    diff = float(aucs[0] - aucs[1])
    if variance <= 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(variance)
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "z": float(z), "p": p}


def delong_rows(
    rows: Sequence[Mapping[str, Any]],
    reference: str,
    baselines: Sequence[str],
    seeds: Sequence[int],
    patient_sites: Sequence[str] = (),
    pooling: str = "mean",
) -> list[dict[str, Any]]:
    """DeLong's paired test of `reference` vs each baseline per site and seed, on the cases both tested in
    that seed (the four folds pooled: every image once). Image level treats slices as independent cases;
    sites with patient ids also get a patient-level test (one pooled prediction per patient), which does not."""
    by_run: dict[tuple[str, int, str], list[Mapping[str, Any]]] = {}
    for r in rows:  # grouped once: every (method, seed, site) is read many times below
        by_run.setdefault((r["experiment"], r["seed"], r["site"]), []).append(r)
    out = []
    for site in sorted({r["site"] for r in rows}):
        levels = ["images", "patients"] if site in patient_sites else ["images"]
        for level in levels:
            for baseline in baselines:
                for seed in seeds:
                    cases = {e: _cases(by_run.get((e, seed, site), []), level, pooling) for e in (reference, baseline)}
                    shared = sorted(set(cases[reference]) & set(cases[baseline]))
                    row: dict[str, Any] = {"site": site, "level": level, "reference": reference, "baseline": baseline}
                    row["seed"] = seed
                    row["n_cases"] = len(shared)
                    try:
                        result = delong_test(
                            [cases[reference][k]["label"] for k in shared],
                            [cases[reference][k]["prob_covid"] for k in shared],
                            [cases[baseline][k]["prob_covid"] for k in shared],
                        )
                    except ValueError:
                        result = {}
                    row["auc_reference"] = _pct(result.get("auc_a"))
                    row["auc_baseline"] = _pct(result.get("auc_b"))
                    row["diff"] = _pct(result.get("diff"))
                    row["z"], row["p"] = result.get("z"), result.get("p")
                    out.append(row)
    return out


def _cases(mine: Sequence[Mapping[str, Any]], level: str, pooling: str) -> dict[str, Mapping[str, Any]]:
    """One seed's test cases of a method and site, by image file or by patient (pooled per fold's run)."""
    if level == "images":
        return {r["file"]: r for r in mine}
    return {
        p["patient"]: p
        for fold in sorted({r["fold"] for r in mine})
        for p in pool_by_patient([r for r in mine if r["fold"] == fold], pooling)
    }


def reliability_bins(labels: Sequence[int], probs: Sequence[float], n_bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of predicted probability (the ECE's bins): mean prediction, observed COVID fraction
    and count."""
    probs_a, labels_a = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    which = np.minimum((probs_a * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            bins.append(
                {
                    "mean_prob": float(probs_a[inside].mean()),
                    "observed": float(labels_a[inside].mean()),
                    "n": int(inside.sum()),
                }
            )
    return bins
