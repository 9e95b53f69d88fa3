"""The paper's claims (covidct/report/claims.py): the AUC difference, its interval and p of a comparison are
DeLong's on the pooled cases, and the verdict rule is the one stated before any result."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from covidct.report.claims import CLAIMS, claim_rows, claim_verdict, claims_markdown
from covidct.report.uncertainty import delong_test


def _rows(experiment: str, probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    return [
        {"experiment": experiment, "seed": 643, "fold": i % 4, "site": "A", "file": f"f{i}.png", "patient": "",
         "label": int(y), "prob_covid": float(p), "selection": "last"}
        for i, (p, y) in enumerate(zip(probs, labels))
    ]  # fmt: skip


def test_a_comparison_is_delongs_test_on_the_pooled_cases_and_its_verdict_follows_the_rule() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    good = labels * 0.6 + rng.random(200) * 0.7  # separates the classes well
    poor = labels * 0.1 + rng.random(200)  # barely
    rows = _rows("ours", good, labels) + _rows("sepnorm", poor, labels)
    c4 = [r for r in claim_rows(rows, [643], patient_sites=[]) if r["claim"] == "C4"]
    assert len(c4) == 1 and c4[0]["n_cases"] == 200
    auc = {n: mannwhitneyu(p[labels == 1], p[labels == 0]).statistic / (labels.sum() * (200 - labels.sum()))
           for n, p in (("good", good), ("poor", poor))}  # fmt: skip
    assert c4[0]["auc_better"] == pytest.approx(100 * auc["good"])
    assert c4[0]["diff"] == pytest.approx(100 * (auc["good"] - auc["poor"]))
    assert c4[0]["p"] == pytest.approx(delong_test(labels, good, poor)["p"])
    assert c4[0]["low"] < c4[0]["diff"] < c4[0]["high"] and c4[0]["low"] > 0  # significant: the interval excludes 0
    assert c4[0]["verdict"] == "reproduced"
    reversed_rows = _rows("ours", poor, labels) + _rows("sepnorm", good, labels)
    assert [r["verdict"] for r in claim_rows(reversed_rows, [643], []) if r["claim"] == "C4"] == ["not reproduced"]
    same = _rows("ours", good, labels) + _rows("sepnorm", good + 1e-3 * rng.random(200), labels)
    assert [r["verdict"] for r in claim_rows(same, [643], []) if r["claim"] == "C4"] == ["inconclusive"]
    c3 = [r for r in claim_rows(rows, [643], []) if r["claim"] == "C3"]
    assert [r["verdict"] for r in c3] == ["missing"]  # no Joint runs
    text = claims_markdown(claim_rows(rows, [643], []), {"ours": "Ours", "sepnorm": "SepNorm"})
    assert "## C4: " + CLAIMS["C4"][0] + ": **reproduced**" in text and "**missing**" in text


def test_a_claim_holds_only_when_every_comparison_does() -> None:
    assert claim_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert claim_verdict(["reproduced", "inconclusive"]) == "inconclusive"
    assert claim_verdict(["reproduced", "not reproduced", "inconclusive"]) == "not reproduced"
    assert claim_verdict(["reproduced", "missing"]) == "missing"
