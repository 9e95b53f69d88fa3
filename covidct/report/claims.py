"""The paper's claims (C1-C6 of issue 22) checked on a sweep's test predictions: for each comparison the AUC
difference (better - worse, in points) with its 95% interval and DeLong's p, per site and seed, image level and,
where a site has patient ids, patient level; then a verdict per claim.

Pure functions from the report's prediction rows to rows and markdown; the verdict rule is fixed here, before any
result is seen: a comparison is `reproduced` when the difference is positive with p < 0.05, `not reproduced` when it
is negative with p < 0.05, `inconclusive` otherwise; a claim is reproduced when all its comparisons are, not
reproduced when any is, inconclusive otherwise (a claim missing a method's runs is `missing`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scipy import stats

from covidct.report.table1 import markdown_table
from covidct.report.uncertainty import delong_rows

ALPHA = 0.05
# claim -> (what the paper says, [(better, worse)]): the paper's Table I rows by experiment name
CLAIMS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "C1": ("the redesigned net beats COVID-Net", [("single", "single_covidnet"), ("joint", "joint_covidnet")]),
    "C2": ("Single (Redesign) beats Joint (Redesign): mixing sites hurts", [("single", "joint")]),
    "C3": ("SepNorm beats Joint", [("sepnorm", "joint")]),
    "C4": ("SepNorm + contrastive (ours) beats SepNorm", [("ours", "sepnorm")]),
    "C5": (
        "ours is best on both sites",
        [
            ("ours", other)
            for other in ("single_covidnet", "single", "joint_covidnet", "joint", "series_adapter")
            + ("parallel_adapter", "msnet", "sepnorm")
        ],
    ),
    "C6": (
        "MS-Net and the adapters fall between Joint and ours",
        [(m, "joint") for m in ("series_adapter", "parallel_adapter", "msnet")]
        + [("ours", m) for m in ("series_adapter", "parallel_adapter", "msnet")],
    ),
}
CLAIM_EXPERIMENTS = sorted({method for _, pairs in CLAIMS.values() for pair in pairs for method in pair})
CLAIM_COLUMNS = (
    "claim", "better", "worse", "site", "level", "seed", "n_cases", "auc_better", "auc_worse", "diff", "low",
    "high", "p", "verdict",
)  # fmt: skip


def comparison_verdict(diff: float | None, p: float | None) -> str:
    if diff is None or p is None:
        return "missing"
    if p < ALPHA:
        return "reproduced" if diff > 0 else "not reproduced"
    return "inconclusive"


def claim_verdict(verdicts: Sequence[str]) -> str:
    if not verdicts or "missing" in verdicts:
        return "missing"
    if "not reproduced" in verdicts:
        return "not reproduced"
    return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive"


def _interval(diff: float | None, z: float | None) -> tuple[float | None, float | None]:
    """DeLong's 95% interval of the difference: diff -/+ 1.96 standard errors (the error is diff / z)."""
    if diff is None or z is None or z == 0 or math.isinf(z):
        return None, None
    half = abs(diff / z) * stats.norm.ppf(1 - ALPHA / 2)
    return diff - half, diff + half


def claim_rows(
    rows: Sequence[Mapping[str, Any]], seeds: Sequence[int], patient_sites: Sequence[str], pooling: str = "mean"
) -> list[dict[str, Any]]:
    """One row per claim, comparison, site, level and seed (each seed's folds pooled, every case once)."""
    out = []
    for claim, (_, pairs) in CLAIMS.items():
        for better, worse in pairs:
            for test in delong_rows(rows, better, [worse], seeds, patient_sites, pooling):
                low, high = _interval(test["diff"], test["z"])
                out.append(
                    {
                        "claim": claim,
                        "better": better,
                        "worse": worse,
                        **{k: test[k] for k in ("site", "level", "seed", "n_cases")},
                        "auc_better": test["auc_reference"],
                        "auc_worse": test["auc_baseline"],
                        "diff": test["diff"],
                        "low": low,
                        "high": high,
                        "p": test["p"],
                        "verdict": comparison_verdict(test["diff"], test["p"]),
                    }
                )
    return out


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def claims_markdown(rows: Sequence[Mapping[str, Any]], methods: Mapping[str, str]) -> str:
    """Each claim's verdict, then its comparisons: AUC of both, the difference with its 95% interval, p."""
    lines = [
        "# The paper's claims, checked",
        "",
        "AUC difference (better - worse, points) on each seed's pooled test predictions (every case once), its 95% "
        f"interval and DeLong's p. A comparison is reproduced when the difference is positive with p < {ALPHA}, not "
        "reproduced when negative with p < 0.05, inconclusive otherwise; a claim is reproduced when all its "
        "comparisons are, not reproduced when any is. Image-level tests treat slices as independent cases; the "
        "patient level (sites with patient ids) does not.",
        "",
    ]
    for claim, (said, _) in CLAIMS.items():
        mine = [r for r in rows if r["claim"] == claim]
        lines += [f"## {claim}: {said}: **{claim_verdict([r['verdict'] for r in mine])}**", ""]
        header = ["better", "worse", "site", "level", "seed", "n", "AUC better", "AUC worse", "diff [95% CI]", "p"]
        lines += markdown_table(
            [*header, "verdict"],
            (
                [methods.get(r["better"], r["better"]), methods.get(r["worse"], r["worse"]), r["site"], r["level"]]
                + [r["seed"], r["n_cases"], _num(r["auc_better"]), _num(r["auc_worse"])]
                + [f"{_num(r['diff'])} [{_num(r['low'])}, {_num(r['high'])}]", _p(r["p"]), r["verdict"]]
                for r in mine
            ),
        )
        lines.append("")
    return "\n".join(lines)
