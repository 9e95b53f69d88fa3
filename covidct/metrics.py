"""Binary metrics of one set of test predictions, at image or patient level.

One definition for the run records and the report, so a table recomputed from `predictions.csv` is the
record. COVID is the positive class; a probability above 0.5 predicts COVID (torchmetrics' threshold, as
the logged metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_calibration_error,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from covidct.records import UNSEEN_COLUMN

METRIC_NAMES = ("acc", "f1", "recall", "precision", "auc")  # Table I's
ECE_BINS = 15
PATIENT_POOLINGS = ("mean", "max")
LEVELS = ("images", "patients")  # a test section's: per image, and per patient where a site has patient ids
DECISION_THRESHOLD = 0.5  # P(COVID) above it predicts COVID: torchmetrics' default, so the logged metrics agree

# Every statistic of a set of predictions, by name: (P(COVID) as float64, labels as long) -> a scalar. The run
# records and every table of the report (image and patient level, leave-one-site-out) take theirs from here, and
# the report recomputes them from each run's predictions.csv: a statistic added here has a value for runs recorded
# before it existed. Table I's five, then the expected calibration error (L1, ECE_BINS equal-width bins).
STATISTICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "acc": lambda preds, target: binary_accuracy(preds, target, threshold=DECISION_THRESHOLD),
    "f1": lambda preds, target: binary_f1_score(preds, target, threshold=DECISION_THRESHOLD),
    "recall": lambda preds, target: binary_recall(preds, target, threshold=DECISION_THRESHOLD),
    "precision": lambda preds, target: binary_precision(preds, target, threshold=DECISION_THRESHOLD),
    "auc": lambda preds, target: binary_auroc(preds, target),
    "ece": lambda preds, target: binary_calibration_error(preds, target, n_bins=ECE_BINS, norm="l1"),
}


def predicts_covid(prob_covid: float, threshold: float = DECISION_THRESHOLD) -> bool:
    """The decision rule of every metric and prediction (torchmetrics': preds > threshold): a probability at the
    threshold is not COVID."""
    return prob_covid > threshold


def undefined_metrics(labels: Sequence[int], probs: Sequence[float]) -> dict[str, str]:
    """The metrics a set of predictions leaves undefined, with why (torchmetrics would report 0 for them)."""
    positives = sum(1 for y in labels if y == 1)
    negatives = len(labels) - positives
    predicted = sum(1 for p in probs if predicts_covid(p))
    why: dict[str, str] = {}
    if positives == 0 or negatives == 0:
        why["auc"] = f"only {'non-COVID' if positives == 0 else 'COVID'} cases: AUC needs both classes"
    if positives == 0:
        why["recall"] = "no COVID cases"
    if predicted == 0:
        why["precision"] = "no case predicted COVID"
    if positives == 0 and predicted == 0:
        why["f1"] = "no COVID cases and none predicted"
    return why


def binary_metrics(labels: Sequence[int], probs: Sequence[float]) -> dict[str, float | None]:
    """Every statistic of STATISTICS; None for a metric the predictions leave undefined (`undefined_metrics`),
    never a 0 that a mean would count."""
    preds = torch.tensor(list(probs), dtype=torch.float64)
    target = torch.tensor(list(labels), dtype=torch.long)
    undefined = undefined_metrics(labels, probs)
    return {name: None if name in undefined else float(f(preds, target)) for name, f in STATISTICS.items()}


def patient_of(row: Mapping[str, Any]) -> str:
    """The unit of patient-level results: the patient id, or the image itself where no id is known."""
    return row.get("patient") or f"image:{row['file']}"


def pool_by_patient(rows: Iterable[Mapping[str, Any]], pooling: str = "mean") -> list[dict[str, Any]]:
    """One prediction per patient: its slices' probabilities pooled by mean or max; COVID if any slice is."""
    if pooling not in PATIENT_POOLINGS:
        raise ValueError(f"patient pooling must be one of {PATIENT_POOLINGS}, got {pooling!r}")
    slices: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        slices.setdefault(patient_of(row), []).append(row)
    pooled = []
    for patient in sorted(slices):
        probs = [float(r["prob_covid"]) for r in slices[patient]]
        prob = sum(probs) / len(probs) if pooling == "mean" else max(probs)
        label = max(int(r["label"]) for r in slices[patient])
        pooled.append({"patient": patient, "label": label, "prob_covid": prob, "slices": len(probs)})
    return pooled


def evaluate(rows: Sequence[Mapping[str, Any]], patient_sites: Iterable[str], pooling: str) -> dict[str, Any]:
    """{"images": {site: metrics}, "patients": {site: metrics}} of one selection's test predictions;
    patient-level for the sites whose images carry patient ids; "undefined": why, where a metric is null."""
    sites = sorted({r["site"] for r in rows})
    by_site = {site: [r for r in rows if r["site"] == site] for site in sites}
    cases: dict[tuple[str, str], list[Mapping[str, Any]]] = {("images", site): rs for site, rs in by_site.items()}
    for site in sorted(set(patient_sites) & set(sites)):
        cases[("patients", site)] = pool_by_patient(by_site[site], pooling)
    result: dict[str, Any] = {"images": {}, "patients": {}}
    undefined: dict[str, str] = {}
    for (level, site), items in cases.items():
        labels, probs = [r["label"] for r in items], [r["prob_covid"] for r in items]
        result[level][site] = binary_metrics(labels, probs)
        undefined |= {f"{level}/{site}/{name}": why for name, why in undefined_metrics(labels, probs).items()}
    if undefined:
        result["undefined"] = undefined
    return result


def patient_sites(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sites whose predictions carry patient ids (as a run's test part does: they get patient-level
    results)."""
    return sorted({row["site"] for row in rows if row["patient"]})


def recomputed_test(test: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], pooling: str) -> dict[str, Any]:
    """A record's `test` section computed from its prediction rows: per checkpoint selection the seen sites'
    images and patients (pooled by `pooling`) and each unseen-site norm choice's; what else a selection holds (its
    checkpoint, epoch, validation AUC) is kept. What a run, an evaluation and the report (from predictions.csv)
    all compute, so the three cannot differ."""
    with_patients = patient_sites(rows)
    out: dict[str, Any] = {}
    for selection, result in test.items():
        mine = [row for row in rows if row["selection"] == selection]
        seen = [row for row in mine if not row.get(UNSEEN_COLUMN)]
        kept = {key: value for key, value in result.items() if key not in (*LEVELS, "undefined", "unseen")}
        out[selection] = {**kept, **evaluate(seen, with_patients, pooling)}
        choices = list(dict.fromkeys(row[UNSEEN_COLUMN] for row in mine if row.get(UNSEEN_COLUMN)))
        if choices:
            out[selection]["unseen"] = {
                how: evaluate([row for row in mine if row.get(UNSEEN_COLUMN) == how], with_patients, pooling)
                for how in choices
            }
    return out
