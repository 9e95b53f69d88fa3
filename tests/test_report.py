"""The report: golden files on synthetic run records, every statistic against its definition, and the CLI."""

import csv
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchmetrics.functional.classification import binary_auroc

from covidct.data.sites import paper_site
from covidct.errors import ConfigError
from covidct.experiments import table1_experiments
from covidct.metrics import STATISTICS, binary_metrics, evaluate, pool_by_patient
from covidct.report import write as report_write
from covidct.report.__main__ import main as report_main
from covidct.report.curves import plot_reliability, plot_rocs, reliability_figure, roc_figure
from covidct.report.publish import JOURNAL, is_output, report_outputs
from covidct.report.render import build_report, curve_caption, render_files
from covidct.report.table1 import DuplicateRunError, collect_results, paired_ttests
from covidct.report.uncertainty import bootstrap_interval, delong_test, reliability_bins, weighted_metric
from tests.helpers import REPO

GOLDEN = Path(__file__).parent / "golden"
PAPER = list(csv.DictReader((Path(__file__).parents[1] / "experiments" / "paper_table1.csv").open()))
FOLDS, SEEDS = [0, 1], [643, 644]
PROVENANCE = {"protocol": "fixture", "selection": "last", "device": "cpu", "date": "2026-01-01 00:00 UTC"}


def level(i: int, f: int, k: int, j: int, site: str) -> float:
    """A deterministic metric value: each method a level, with fold, seed and metric offsets."""
    base = 0.55 + 0.04 * i + 0.013 * f + 0.007 * k * (1 + j) - 0.05 * (site == "B") - 0.01 * j
    return base + 0.003 * ((3 * i + 5 * f + 7 * k) % 4)


def fake_records(block: str = "centralised") -> list[dict]:
    """Records of the new layout: parallel_adapter has no runs and msnet misses one, so the table must mark
    both; fold 0 of every method also has a best-validation result (a little lower)."""
    records = []
    for i, experiment in enumerate(e.name for e in table1_experiments(block=block)):
        if experiment == "parallel_adapter":
            continue
        for f in FOLDS:
            for k, s in enumerate(SEEDS):
                if experiment == "msnet" and (f, s) == (1, 644):
                    continue
                images = {site: {m: level(i, f, k, j, site) for j, m in enumerate(STATISTICS)} for site in "AB"}
                patients = {"B": {m: v + 0.02 for m, v in images["B"].items()}}
                test = {"last": {"checkpoint": "checkpoints/last.ckpt", "images": images, "patients": patients}}
                if f == 0:
                    lower = {site: {m: v - 0.01 for m, v in values.items()} for site, values in images.items()}
                    test["best_val_auc"] = {"checkpoint": "checkpoints/best.ckpt", "images": lower, "patients": {}}
                run = {"experiment": experiment, "fold": f, "seed": s, "group_by": "patient", "split_seed": 0}
                run["splits"] = {"sites": {site: {"test": {"images": 20, "covid": 10}} for site in "AB"}}
                records.append({"test": test, "run": run})
    records.append({**records[0], "run": {**records[0]["run"], "seed": 999}})  # outside the sweep: ignored
    return records


def fake_predictions(record: dict) -> list[dict]:
    """20 test images per site, each fold its own; site B's in patients of two slices of one class. Better
    methods separate the classes better, with deterministic noise, so every statistic has work to do."""
    run = record["run"]
    noise = random.Random(f"{run['experiment']}-{run['fold']}-{run['seed']}")
    rows = []
    for site in "AB":
        auc = record["test"]["last"]["images"][site]["auc"]
        for n in range(20):
            label = n % 2
            prob = min(1.0, max(0.0, 0.5 + (label - 0.5) * (auc - 0.45) + noise.gauss(0, 0.15)))
            patient = f"p{run['fold']}-{label}-{n // 4}" if site == "B" else ""
            for selection in record["test"]:
                rows.append(
                    {
                        "selection": selection,
                        "site": site,
                        "file": f"f{run['fold']}/{n}.png",
                        "patient": patient,
                        "label": label,
                        "prob_covid": round(prob, 4),
                        "experiment": run["experiment"],
                        "fold": run["fold"],
                        "seed": run["seed"],
                    }
                )
    return rows


def report_with(selection: str = "last", pooling: str = "mean") -> dict:
    records = fake_records()
    predictions = [row for r in records[:-1] for row in fake_predictions(r)]
    return build_report(records, predictions, PAPER, FOLDS, SEEDS, selection, pooling)


def report(selection: str = "last") -> dict:
    return report_with(selection)


@pytest.mark.parametrize("name", ["table1.md", "table1.csv", "table1.tex", "ttests.csv", "intervals.csv", "delong.csv"])
def test_golden_files(name: str):
    text = render_files(report(), PROVENANCE)[name]
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


# Beyond Table I: a new method whose records carry its row 10 (no paper values), and an ad-hoc experiment
# whose records' config has no table1 block at all (nor has the registry an entry for it).
EXTRA = {
    "new_method": {"name": "new_method", "table1": {"row": 10, "label": "New method (row 10)", "paper": None}},
    "adhoc": {"name": "adhoc", "seed": 643},
}


def extra_records() -> list[dict]:
    """fake_records and two runs (fold x seed) of each experiment of EXTRA, the sweep's folds and seeds."""
    records = fake_records()[:-1]
    for i, (experiment, config) in enumerate(EXTRA.items(), start=len(table1_experiments(block="centralised"))):
        for f in FOLDS:
            for k, s in enumerate(SEEDS):
                images = {site: {m: level(i, f, k, j, site) for j, m in enumerate(STATISTICS)} for site in "AB"}
                patients = {"B": {m: v - 0.02 for m, v in images["B"].items()}}
                test = {"last": {"checkpoint": "checkpoints/last.ckpt", "images": images, "patients": patients}}
                run = {"experiment": experiment, "fold": f, "seed": s, "group_by": "patient", "split_seed": 0}
                records.append({"test": test, "run": run, "config": config})
    return records


def extra_report() -> dict:
    records = extra_records()
    return build_report(records, [row for r in records for row in fake_predictions(r)], PAPER, FOLDS, SEEDS, "last")


@pytest.mark.parametrize("name", ["table1.md", "table1.csv"])
def test_experiments_without_a_paper_row_follow_table1_and_are_not_dropped(name: str):
    text = render_files(extra_report(), PROVENANCE)[name]
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / "extra" / name).write_text(text)
    assert text == (GOLDEN / "extra" / name).read_text()
    names = [e.name for e in table1_experiments(block="centralised")]
    if name == "table1.csv":
        rows = list(csv.DictReader(text.splitlines()))
        order = list(dict.fromkeys(r["experiment"] for r in rows))
        assert order == [*names, "new_method", "adhoc"]
        extra = [r for r in rows if r["experiment"] in EXTRA]
        assert {r["method"] for r in extra} == {"New method (row 10)", "adhoc"}
        assert extra and all(r["n"] == r["expected"] for r in extra)  # every run of theirs counted
        assert all(not r["paper_mean"] for r in extra)  # no paper values of their own
        # Table I's own rows are those of the report without the extras, unchanged
        golden = (GOLDEN / "table1.csv").read_text().splitlines()
        assert [line for line in text.splitlines() if line.split(",")[3] not in EXTRA] == golden
    else:
        table = text.split("### Site A")[1].split("###")[0]
        assert table.index("SepNorm + Contrastive (ours)") < table.index("New method (row 10)") < table.index("| adhoc")
        assert "experiments without a Table I row (adhoc)" in text
        assert "| A | auc | New method (row 10) |" in text and "| A | auc | adhoc |" in text  # t-tests against ours


def test_a_records_own_table1_block_decides_its_row_and_label():
    records = fake_records()
    for record in records:
        if record["run"]["experiment"] == "single":  # relabelled and moved below ours by its records
            record["config"] = {"table1": {"row": 12, "label": "Single, relabelled", "paper": "single"}}
    rows = collect_results(records, PAPER, FOLDS, SEEDS)
    order = list(dict.fromkeys((r["experiment"], r["method"]) for r in rows))
    assert order[-1] == ("single", "Single, relabelled") and len(order) == len(table1_experiments(block="centralised"))
    assert _cell(rows, "single", "A", "acc")["paper_mean"] is not None  # its paper key still finds the paper's


def test_records_that_disagree_on_a_row_or_hold_a_malformed_one_are_refused():
    records = fake_records()
    records[0]["config"] = {"table1": {"row": 3, "label": "Single (COVID-Net)", "paper": "single_covidnet"}}
    with pytest.raises(ConfigError, match="run records of single_covidnet disagree on its Table I row"):
        collect_results(records, PAPER, FOLDS, SEEDS)
    records[0]["config"] = {"table1": {"row": "first", "label": "Single (COVID-Net)"}}
    with pytest.raises(ConfigError, match=r"config.table1\): table1.row must be a positive integer, got 'first'"):
        collect_results(records, PAPER, FOLDS, SEEDS)


def _cell(rows: list[dict], experiment: str, site: str, metric: str) -> dict:
    return next(r for r in rows if (r["experiment"], r["site"], r["metric"]) == (experiment, site, metric))


def test_runs_aggregation_is_mean_and_sample_std_over_folds_and_seeds():
    rows = collect_results(fake_records(), PAPER, FOLDS, SEEDS, aggregation="runs")
    cell = _cell(rows, "sepnorm", "B", "f1")
    values = [100 * level(7, f, k, 1, "B") for f in FOLDS for k in range(len(SEEDS))]
    assert cell["n"] == cell["expected"] == 4 and cell["mean"] == pytest.approx(statistics.fmean(values))
    assert cell["std"] == pytest.approx(statistics.stdev(values))
    assert (cell["paper_mean"], cell["paper_std"]) == (75.02, 1.14)
    assert len(rows) == len(table1_experiments(block="centralised")) * 2 * len(STATISTICS)
    assert all(r["n"] == 0 and r["mean"] is None for r in rows if r["experiment"] == "parallel_adapter")
    assert all(r["n"] == 3 for r in rows if r["experiment"] == "msnet")


def test_paper_aggregation_is_the_4_fold_estimate_per_seed_then_mean_and_std_over_seeds():
    rows = collect_results(fake_records(), PAPER, FOLDS, SEEDS, aggregation="paper")
    cell = _cell(rows, "sepnorm", "A", "auc")
    per_seed = [statistics.fmean(100 * level(7, f, k, 4, "A") for f in FOLDS) for k in range(len(SEEDS))]
    assert cell["n"] == cell["expected"] == 2
    assert cell["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert cell["std"] == pytest.approx(statistics.stdev(per_seed))
    # msnet misses fold 1 of seed 644: that seed has no 4-fold estimate
    assert _cell(rows, "msnet", "A", "auc")["n"] == 1


def test_patient_level_rows_and_selection_at_report_time():
    patients = collect_results(fake_records(), PAPER, FOLDS, SEEDS, aggregation="runs", level="patients")
    assert {r["site"] for r in patients} == {"B"} and all(r["paper_mean"] is None for r in patients)
    cell = _cell(patients, "ours", "B", "acc")
    assert cell["mean"] == pytest.approx(
        statistics.fmean(100 * (level(8, f, k, 0, "B") + 0.02) for f in FOLDS for k in (0, 1))
    )
    best = collect_results(fake_records(), PAPER, FOLDS, SEEDS, selection="best_val_auc", aggregation="runs")
    cell = _cell(best, "ours", "A", "acc")
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(
        statistics.fmean(100 * (level(8, 0, k, 0, "A") - 0.01) for k in (0, 1))
    )
    text = render_files(report("best_val_auc"), {**PROVENANCE, "selection": "best_val_auc"})["table1.md"]
    assert "Checkpoint selection `best_val_auc`" in text and "have no `best_val_auc` result" in text


@pytest.mark.parametrize("aggregation", ["paper", "runs"])
def test_paired_ttest_matches_the_textbook_formula(aggregation: str):
    tests = paired_ttests(fake_records(), FOLDS, SEEDS, aggregation=aggregation)
    row = next(t for t in tests if (t["site"], t["metric"], t["baseline"]) == ("A", "auc", "sepnorm"))
    per_run = {(f, k): 100 * (level(8, f, k, 4, "A") - level(7, f, k, 4, "A")) for f in FOLDS for k in (0, 1)}
    if aggregation == "runs":
        diffs = list(per_run.values())
    else:
        diffs = [statistics.fmean(per_run[(f, k)] for f in FOLDS) for k in (0, 1)]
    assert row["n_pairs"] == len(diffs) == (4 if aggregation == "runs" else 2)
    assert row["mean_diff"] == pytest.approx(statistics.fmean(diffs))
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))
    assert row["t"] == pytest.approx(t)
    assert all(t["n_pairs"] == 0 and t["p"] is None for t in tests if t["baseline"] == "parallel_adapter")


def test_duplicate_runs_are_refused():
    records = fake_records()
    with pytest.raises(DuplicateRunError, match="experiment=single_covidnet fold=0 seed=643"):
        collect_results([*records, records[0]], PAPER, FOLDS, SEEDS)


def test_patient_pooling_by_mean_and_max_and_unmapped_images_count_alone():
    rows = [
        {"file": "a", "patient": "p1", "label": 1, "prob_covid": 0.2},
        {"file": "b", "patient": "p1", "label": 1, "prob_covid": 0.8},
        {"file": "c", "patient": "", "label": 0, "prob_covid": 0.3},
        {"file": "d", "patient": "", "label": 0, "prob_covid": 0.6},
    ]
    mean = {p["patient"]: p["prob_covid"] for p in pool_by_patient(rows, "mean")}
    assert mean == {"p1": pytest.approx(0.5), "image:c": 0.3, "image:d": 0.6}
    assert {p["patient"]: p["prob_covid"] for p in pool_by_patient(rows, "max")}["p1"] == 0.8
    metrics = binary_metrics([1, 0, 0], [0.5, 0.3, 0.6])
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["auc"] == pytest.approx(0.5)
    # ECE by hand, 15 bins: |0.5 - 1|, |0.3 - 0|, |0.6 - 0|, each in its own bin, weighted 1/3
    assert metrics["ece"] == pytest.approx((0.5 + 0.3 + 0.6) / 3)


def test_weighted_auc_and_accuracy_are_the_metrics_of_the_repeated_predictions():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    probs = np.round(np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.3, 300), 0, 1), 1)  # many ties
    weights = rng.integers(0, 4, (5, 300))
    for w in weights:
        repeated = np.repeat(np.arange(300), w)
        auc = float(binary_auroc(torch.tensor(probs[repeated]), torch.tensor(labels[repeated])))
        assert weighted_metric("auc", w, labels, probs)[0] == pytest.approx(auc, abs=1e-6)
        acc = np.mean((probs[repeated] > 0.5) == labels[repeated])
        assert weighted_metric("acc", w, labels, probs)[0] == pytest.approx(acc)


def test_bootstrap_interval_is_scipys_over_whole_units_stratified_by_class():
    """The same resamples as scipy.stats.bootstrap with the plain statistic: COVID and non-COVID units drawn
    separately, and the AUC of the drawn units' predictions, all slices of a unit together."""
    rng = np.random.default_rng(4)
    units = [f"p{i // 3}" for i in range(90)]
    unit_labels = rng.integers(0, 2, 30)
    labels = np.repeat(unit_labels, 3)
    probs = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, 90), 0, 1)
    estimate, low, high = bootstrap_interval("auc", units, labels, probs, n_resamples=300, seed=7)
    members = [np.arange(3 * u, 3 * u + 3) for u in range(30)]

    def plain(covid, non_covid):
        rows = np.concatenate([members[u] for u in [*covid, *non_covid]])
        return float(binary_auroc(torch.tensor(probs[rows]), torch.tensor(labels[rows])))

    expected = stats.bootstrap(
        (np.flatnonzero(unit_labels == 1), np.flatnonzero(unit_labels == 0)),
        plain,
        n_resamples=300,
        method="percentile",
        vectorized=False,
        paired=False,
        batch=max(1, 2_000_000 // 90),
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert low < estimate < high
    assert estimate == pytest.approx(float(binary_auroc(torch.tensor(probs), torch.tensor(labels))), abs=1e-6)


def test_delong_matches_the_definition():
    """DeLong et al. (1988): structural components V10, V01 from all pairs, their covariances, and z."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40)
    a = np.round(np.clip(0.5 + 0.4 * (labels - 0.5) + rng.normal(0, 0.25, 40), 0, 1), 1)
    b = np.round(np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.25, 40), 0, 1), 1)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    components = []
    for s in (a, b):
        pos, neg = s[labels == 1], s[labels == 0]
        v10 = np.array([np.mean([psi(x, y) for y in neg]) for x in pos])
        v01 = np.array([np.mean([psi(x, y) for x in pos]) for y in neg])
        components.append((v10.mean(), v10, v01))
    m, n = (labels == 1).sum(), (labels == 0).sum()
    s10 = np.cov(np.vstack([components[0][1], components[1][1]]))
    s01 = np.cov(np.vstack([components[0][2], components[1][2]]))
    cov = s10 / m + s01 / n
    z = (components[0][0] - components[1][0]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    result = delong_test(labels, a, b)
    assert result["auc_a"] == pytest.approx(components[0][0]) and result["auc_b"] == pytest.approx(components[1][0])
    assert result["z"] == pytest.approx(z) and result["p"] == pytest.approx(2 * stats.norm.sf(abs(z)))


def test_max_pooling_is_recomputed_from_the_predictions_at_report_time():
    max_report = report_with(pooling="max")
    cell = _cell(max_report["tables"][("runs", "patients")], "ours", "B", "auc")
    records = fake_records()
    ours = [r for r in records[:-1] if r["run"]["experiment"] == "ours"]
    expected = []
    for record in ours:
        rows = [p for p in fake_predictions(record) if p["site"] == "B" and p["selection"] == "last"]
        pooled = pool_by_patient(rows, "max")
        expected.append(100 * binary_metrics([p["label"] for p in pooled], [p["prob_covid"] for p in pooled])["auc"])
    assert cell["mean"] == pytest.approx(statistics.fmean(expected))
    assert cell["mean"] != _cell(report()["tables"][("runs", "patients")], "ours", "B", "auc")["mean"]


def test_reliability_bins_by_hand():
    bins = reliability_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.12, 0.95, 0.91], n_bins=10)
    assert bins == [
        {"mean_prob": 0.05, "observed": 0.0, "n": 1},
        {"mean_prob": pytest.approx(0.135), "observed": 1.0, "n": 2},
        {"mean_prob": pytest.approx(0.93), "observed": 0.5, "n": 2},
    ]


def _write_runs(runs: Path) -> None:
    """fake_records as run folders, each record's metrics those of its predictions, as a run records them."""
    for i, record in enumerate(fake_records()):
        folder = runs / record["run"]["experiment"] / f"run{i}"
        folder.mkdir(parents=True)
        predictions = fake_predictions(record)
        for selection, result in record["test"].items():
            result.update(evaluate([r for r in predictions if r["selection"] == selection], ["B"], "mean"))
        (folder / "metrics.json").write_text(json.dumps(record))
        (folder / "timing.json").write_text(json.dumps({"finished_at": f"2026-01-{1 + i % 20:02d} 10:00 UTC"}))
        columns = ["selection", "site", "file", "patient", "label", "prob_covid"]
        lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in predictions]
        (folder / "predictions.csv").write_text("\n".join(lines) + "\n")


OUTPUTS = (
    "table1.md",
    "table1.csv",
    "table1.tex",
    "ttests.csv",
    "intervals.csv",
    "delong.csv",
    "provenance.json",
    "roc_A.png",
    "roc_B.png",
    "reliability_A.png",
    "reliability_B.png",
)


def test_cli_writes_every_output_and_a_rerun_gives_the_same_bytes(tmp_path: Path):
    runs = tmp_path / "runs"
    _write_runs(runs)
    out = tmp_path / "out"
    args = ["--runs", str(runs), "--out", str(out), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main(args) == 0
    first = {name: (out / name).read_bytes() for name in OUTPUTS}
    assert Image.open(out / "reliability_B.png").size[0] > 300
    table = (out / "table1.md").read_text()
    assert "missing (0/2)" in table and "(1/2)*" in table and "(3/4)*" in table
    assert "Patient level" in table and "DeLong" in table and "95% confidence intervals" in table
    assert json.loads(first["provenance.json"])["date"] == "2026-01-20 10:00 UTC"  # the newest record's
    assert report_main(args) == 0
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == first
    assert report_main([*args, "--select", "best_val_auc"]) == 0
    assert "Checkpoint selection `best_val_auc`" in (out / "table1.md").read_text()
    assert report_main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_runs_of_several_folders_make_the_one_folder_s_table(tmp_path: Path):
    """--runs repeated: a sweep kept apart from another (a federated one beside Table I's) in one report."""
    runs, apart = tmp_path / "runs", tmp_path / "apart"
    _write_runs(runs)
    experiments = sorted(p.name for p in runs.iterdir())
    apart.mkdir()
    args = ["--folds", "0,1", "--seeds", "643,644"]
    assert report_main(["--runs", str(runs), "--out", str(tmp_path / "one"), *args]) == 0
    for name in experiments[: len(experiments) // 2]:
        (runs / name).rename(apart / name)
    assert report_main(["--runs", str(runs), "--runs", str(apart), "--out", str(tmp_path / "two"), *args]) == 0
    for name in ("table1.csv", "delong.csv", "ttests.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert report_main(["--runs", str(runs), "--out", str(tmp_path / "half"), *args]) == 0
    assert (tmp_path / "half" / "table1.csv").read_bytes() != (tmp_path / "one" / "table1.csv").read_bytes()
    # make table1-collect's form: each folder where it exists (the Federated block's may not yet), none: one line
    absent = tmp_path / "not-run-yet"
    present = ["--runs-if-present", str(runs), "--runs-if-present", str(apart), "--runs-if-present", str(absent)]
    assert report_main([*present, "--out", str(tmp_path / "three"), *args]) == 0
    assert (tmp_path / "three" / "table1.csv").read_bytes() == (tmp_path / "one" / "table1.csv").read_bytes()
    assert report_main(["--runs-if-present", str(absent), "--out", str(tmp_path / "four"), *args]) == 2
    assert not (tmp_path / "four").exists()


def test_reference_chooses_what_the_ttests_and_delong_compare_with(tmp_path: Path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_runs(runs)
    args = ["--runs", str(runs), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main([*args, "--out", str(out / "ours")]) == 0
    assert report_main([*args, "--out", str(out / "sepnorm"), "--reference", "sepnorm"]) == 0
    tables = {
        (ref, name): list(csv.DictReader((out / ref / f"{name}.csv").open()))
        for ref in ("ours", "sepnorm")
        for name in ("ttests", "delong")
    }
    for name in ("ttests", "delong"):
        assert {r["reference"] for r in tables[("sepnorm", name)]} == {"sepnorm"}
        baselines = {r["baseline"] for r in tables[("sepnorm", name)]}
        assert "ours" in baselines and "sepnorm" not in baselines
    # the same pair seen from the other side: the difference changes sign, the p-value stays
    key = ("paper", "A", "auc")
    mine = next(
        r
        for r in tables[("ours", "ttests")]
        if (r["aggregation"], r["site"], r["metric"]) == key and r["baseline"] == "sepnorm"
    )
    theirs = next(
        r
        for r in tables[("sepnorm", "ttests")]
        if (r["aggregation"], r["site"], r["metric"]) == key and r["baseline"] == "ours"
    )
    assert float(theirs["mean_diff"]) == pytest.approx(-float(mine["mean_diff"]), rel=1e-5)
    assert "the reference, SepNorm, vs each baseline" in (out / "sepnorm" / "table1.md").read_text()
    assert json.loads((out / "sepnorm" / "provenance.json").read_text())["reference (t-tests, DeLong)"] == "sepnorm"
    capsys.readouterr()
    assert report_main([*args, "--out", str(out / "none"), "--reference", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --reference nosuch: no such experiment") and "sepnorm" in err
    assert len(err.splitlines()) == 1 and not (out / "none").exists()


def _cli_figures(runs: Path, out: Path, monkeypatch, *args: str) -> dict[str, tuple]:
    """What the CLI draws each figure from (data, title, caption), by file stem; the figures are still written."""
    drawn = {}

    def spy(plot):
        def draw(data, title, path, caption=""):
            drawn[path.stem] = (data, title, caption)
            return plot(data, title, path, caption)

        return draw

    monkeypatch.setattr(report_write, "plot_rocs", spy(plot_rocs))
    monkeypatch.setattr(report_write, "plot_reliability", spy(plot_reliability))
    assert report_main(["--runs", str(runs), "--out", str(out), "--folds", "0,1", "--seeds", "643,644", *args]) == 0
    return drawn


def _inside(inner, outer) -> bool:
    return outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1


SMOKE = {"name": "smoke", "note": "smoke protocol: networks trained for 2 steps"}


@pytest.mark.parametrize("stem", ["roc", "reliability"])
def test_site_figures_name_the_dataset_keep_the_legend_off_the_axes_and_caption_protocol_and_n(
    stem: str, tmp_path: Path, monkeypatch
):
    runs = tmp_path / "runs"
    _write_runs(runs)
    for path in runs.rglob("metrics.json"):  # runs that record their protocol: it wins over --protocol
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "run": {**record["run"], "protocol": SMOKE}}))
    drawn = _cli_figures(runs, tmp_path / "out", monkeypatch, "--protocol", "paper")
    make = {"roc": roc_figure, "reliability": reliability_figure}[stem]
    for site in ("A", "B"):
        data, title, caption = drawn[f"{stem}_{site}"]
        figure = make(data, title, caption)
        figure.draw_without_rendering()  # runs the layout
        renderer = figure.canvas.get_renderer()
        (axes,) = figure.axes
        assert paper_site(site).dataset in axes.get_title() and f"Site {site}" in axes.get_title()
        plot_area = axes.get_window_extent(renderer)
        legend = axes.get_legend().get_window_extent(renderer)
        (text,) = [t for t in figure.texts if t.get_text().startswith("Protocol")]
        words = " ".join(text.get_text().split())  # unwrapped
        assert "Protocol: smoke (smoke protocol: networks trained for 2 steps)." in words
        assert f"n = 40 test images of site {site}, checkpoint selection last." in words
        assert "4 runs (folds 0, 1; seeds 643, 644), 80 predictions; except MS-Net: 3 runs, 60 predictions." in words
        caption_box = text.get_window_extent(renderer)
        assert not legend.overlaps(plot_area) and not caption_box.overlaps(plot_area)
        assert caption_box.y1 < plot_area.y0  # under the axes
        for box in (legend, caption_box, axes.title.get_window_extent(renderer), plot_area):
            assert _inside(box, figure.bbox)  # nothing cut off at the figure's edge


def test_a_caption_falls_back_on_the_cli_protocol_and_names_every_protocol_of_mixed_runs(tmp_path: Path, monkeypatch):
    _write_runs(tmp_path / "runs")  # records from before runs recorded their protocol
    drawn = _cli_figures(tmp_path / "runs", tmp_path / "out", monkeypatch, "--protocol", "smoke")
    note = "smoke protocol: networks trained for 2 steps; the numbers test the pipeline, not the methods"
    assert drawn["roc_A"][2].startswith(f"Protocol: smoke ({note}).\n")
    mixed = {**report(), "protocols": [("paper", None), ("smoke", SMOKE["note"]), None]}
    assert curve_caption(mixed, "B", ("cpu", None)).startswith(
        "Protocols: paper; smoke (smoke protocol: networks trained for 2 steps); cpu.\n"
    )
    assert curve_caption({**report(), "pooled": {}}, "A", ("paper", None)).endswith("No test predictions of site A.")


def test_cli_logs_the_table_to_wandb_offline_unless_asked(tmp_path: Path, monkeypatch, phantom_root: Path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so the logger's own setting is undone after
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no mode, no key, no network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write_runs(tmp_path / "runs")
    out = tmp_path / "out"
    args = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--folds", "0,1", "--seeds", "643,644", "--wandb"]
    assert report_main(args) == 0
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    # a training with logger=wandb in the same process afterwards is offline by its own config, not by the report's
    from covidct.training.fit import train
    from tests.helpers import FAST, compose_experiment

    train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST, "logger=wandb"]), tmp_path / "run")
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int):
    _write_runs(tmp_path / "runs")
    previous = os.umask(umask)
    try:
        assert report_main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--folds", "0,1"]) == 0
    finally:
        os.umask(previous)
    for name in ("table1.md", "table1.csv", "provenance.json", "roc_A.png"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_broken_record_is_named_and_can_be_left_out(tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    _write_runs(runs)
    half = sorted(runs.glob("ours/*/metrics.json"))[0]
    half.write_text(half.read_text()[:40])
    no_predictions = sorted(runs.glob("sepnorm/*/predictions.csv"))[0]
    no_predictions.unlink()
    args = ["--runs", str(runs), "--out", str(tmp_path / "out"), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {half} is not a usable run record" in err and "--skip-broken" in err
    assert report_main([*args, "--skip-broken"]) == 0
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())["left out (broken records)"]
    assert str(half) in provenance and "predictions.csv is missing" in provenance
    assert "(3/4)*" in (tmp_path / "out" / "table1.md").read_text()


def _cut(lines: list[str]) -> list[str]:
    """Site A's predictions cut to 5 of its 20 images, as a copy interrupted mid-file leaves them."""
    site_a = [k for k, line in enumerate(lines) if line.startswith("last,A,")]
    return [line for k, line in enumerate(lines) if k not in site_a[5:]]


PREDICTION_EDITS = {  # predictions.csv edited -> what the report says of it
    "truncated": (_cut, "selection last, site A: 5 predictions for the 20 test images run.splits records"),
    "a row twice": (lambda lines: [*lines[:2], lines[1], *lines[3:]], "f1/0.png predicted 2 times"),
    "a label flipped": (
        lambda lines: [lines[0], lines[1].replace(",0,", ",1,"), *lines[2:]],
        "11 COVID labels for the 10 run.splits records",
    ),
    "a selection the record lacks": (
        lambda lines: [*lines, lines[1].replace("last,", "best_val_auc,", 1)],
        "selection best_val_auc, site A: 1 rows, but the record has no such test part",
    ),
}


def _refused_after(edit: Callable[[Path], None], tmp_path: Path, capsys) -> tuple[list[str], str]:
    """The report's arguments over the fake runs, and its one-line refusal once `edit` has changed run29 (fold 1 of
    ours: no best_val_auc result)."""
    runs = tmp_path / "runs"
    _write_runs(runs)
    edit(runs / "ours" / "run29")
    args = ["--runs", str(runs), "--out", str(tmp_path / "out"), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main(args) == 2
    return args, capsys.readouterr().err


@pytest.mark.parametrize("edit", PREDICTION_EDITS)
def test_predictions_that_do_not_match_the_records_counts_are_refused_in_one_line(edit: str, tmp_path: Path, capsys):
    change, said = PREDICTION_EDITS[edit]
    predictions = tmp_path / "runs" / "ours" / "run29" / "predictions.csv"
    args, err = _refused_after(
        lambda run: predictions.write_text("\n".join(change(predictions.read_text().splitlines())) + "\n"),
        tmp_path,
        capsys,
    )
    assert err.count("\n") == 1 and err.startswith(f"error: {predictions} does not match its run record metrics.json")
    assert said in err and "--skip-broken" in err
    assert not (tmp_path / "out").exists()
    if edit == "truncated":  # left out on request, and said: its cells count as missing
        assert report_main([*args, "--skip-broken"]) == 0
        provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
        assert str(predictions) in provenance["left out (broken records)"]
        assert "(1/2)*" in (tmp_path / "out" / "table1.md").read_text()


def test_every_metric_is_recomputed_from_the_predictions_and_a_record_that_disagrees_is_named(tmp_path: Path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _write_runs(runs)
    for path in runs.rglob("metrics.json"):  # records from before the ECE: computed for them all the same
        record = json.loads(path.read_text())
        for result in record["test"].values():
            for level in ("images", "patients"):
                for metrics in result[level].values():
                    metrics.pop("ece")
        path.write_text(json.dumps(record))
    args = ["--runs", str(runs), "--out", str(out), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main(args) == 0
    ece = next(
        r
        for r in csv.DictReader((out / "table1.csv").open())
        if (r["aggregation"], r["level"], r["experiment"], r["site"], r["metric"])
        == ("runs", "images", "ours", "A", "ece")
    )
    rows = [list(csv.DictReader(p.open())) for p in sorted(runs.glob("ours/*/predictions.csv"))]
    by_hand = [
        100
        * binary_metrics(
            [int(r["label"]) for r in run if r["site"] == "A" and r["selection"] == "last"],
            [float(r["prob_covid"]) for r in run if r["site"] == "A" and r["selection"] == "last"],
        )["ece"]
        for run in rows
    ]
    assert int(ece["n"]) == len(by_hand) == 4 and float(ece["mean"]) == pytest.approx(
        statistics.fmean(by_hand), rel=1e-5
    )
    path = runs / "ours" / "run29" / "metrics.json"
    record = json.loads(path.read_text())
    recorded = record["test"]["last"]["images"]["A"]["auc"]
    record["test"]["last"]["images"]["A"]["auc"] = 0.125  # edited by hand: the tables would have shown it
    path.write_text(json.dumps(record))
    assert report_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: {path} does not match its predictions.csv (its metrics are not its predictions': "
        f"test.last.images.A.auc is 0.125, but its predictions give {recorded})"
    )
    assert report_main([*args, "--skip-broken"]) == 0
    assert "(1/2)*" in (out / "table1.md").read_text()


def test_a_statistic_added_in_one_function_has_a_value_for_runs_recorded_before_it(tmp_path: Path, monkeypatch):
    """The committed CPU-scale records of ours predate any 'prevalence' statistic; the report computes it."""
    runs = tmp_path / "runs"
    shutil.copytree(REPO / "experiments" / "table1-cpu" / "runs" / "ours", runs / "ours")
    monkeypatch.setitem(STATISTICS, "prevalence", lambda preds, target: target.double().mean())
    args = ["--runs", str(runs), "--out", str(tmp_path / "out"), "--protocol", "cpu", "--folds", "0,1,2,3"]
    assert report_main([*args, "--seeds", "643"]) == 0
    table = list(csv.DictReader((tmp_path / "out" / "table1.csv").open()))
    for level, site in (("images", "A"), ("images", "B"), ("patients", "B")):
        cell = next(
            r
            for r in table
            if (r["aggregation"], r["level"], r["experiment"], r["site"], r["metric"])
            == ("runs", level, "ours", site, "prevalence")
        )
        expected = []
        for folder in sorted((runs / "ours").iterdir()):
            assert "prevalence" not in (folder / "metrics.json").read_text()  # recorded before it existed
            rows = [r for r in csv.DictReader((folder / "predictions.csv").open()) if r["site"] == site]
            rows = [r for r in rows if r["selection"] == "last"]
            if level == "patients":
                rows = pool_by_patient([{**r, "label": int(r["label"]), "prob_covid": 0.0} for r in rows])
            expected.append(100 * statistics.fmean(int(r["label"]) for r in rows))
        assert int(cell["n"]) == 4 and float(cell["mean"]) == pytest.approx(statistics.fmean(expected), rel=1e-5)
    assert "| ECE | prevalence |" in (tmp_path / "out" / "table1.md").read_text()  # a column of its own


EMPTY_RECORDS = {  # metrics.json (valid JSON) -> what the report says of it
    "empty sections": ({"test": {}, "run": {}, "config": {}}, "run.experiment is missing or not a name"),
    "no test result": (lambda r: {**r, "test": {}}, "test is empty: the run recorded no test result"),
    "a selection with no images": (
        lambda r: {**r, "test": {"last": {"images": {}}}},
        "test.last has no metrics of site A, which run.splits says tested 20 images",
    ),
    "a selection that is a list": (lambda r: {**r, "test": {"last": []}}, "test.last is not an object"),
    "a metric that is text": (
        lambda r: {**r, "test": {"last": {"images": {"A": {"auc": "high"}, "B": {}}}}},
        "test.last.images.A.auc is 'high', not a number",
    ),
    "a fold that is not a number": (lambda r: {**r, "run": {**r["run"], "fold": "one"}}, "run.fold is 'one'"),
    "no test counts": (
        lambda r: {**r, "run": {k: v for k, v in r["run"].items() if k != "splits"}},
        "run.splits.sites is missing: no test counts to check predictions.csv against",
    ),
}


@pytest.mark.parametrize("case", EMPTY_RECORDS)
def test_a_record_without_what_the_tables_read_is_named_in_one_line(case: str, tmp_path: Path, capsys):
    change, said = EMPTY_RECORDS[case]
    path = tmp_path / "runs" / "ours" / "run29" / "metrics.json"
    _, err = _refused_after(
        lambda run: path.write_text(json.dumps(change(json.loads(path.read_text())) if callable(change) else change)),
        tmp_path,
        capsys,
    )
    assert err.count("\n") == 1 and err.startswith(f"error: {path} is not a usable run record ({said}")


# `python -m covidct.report` with os.replace wrapped: the process SIGKILLs itself just before its Nth rename
# (0: never) and logs the path each rename gives, so a kill can land at each step of writing the outputs.
KILLED_AT_RENAME = """
import os, signal, sys
from covidct.report.__main__ import main
kill_at, log, renames, rename = int(sys.argv[1]), sys.argv[2], [], os.replace
def replace(src, dst):
    renames.append(dst)
    if len(renames) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    with open(log, "a") as fh:
        fh.write(str(dst) + "\\n")
    return rename(src, dst)
os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


def _report_killed_at(rename: int, out: Path, log: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILLED_AT_RENAME, str(rename), str(log), "--runs", str(out / "runs")]
    command += ["--out", str(out), "--folds", "0,1", "--seeds", "643,644", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in report_outputs(out)}


def _others(out: Path) -> dict[str, bytes]:
    """Everything in OUT that is not the report's: the runs and the README of a committed layout."""
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    mine = [p for p in files if p.parts[0].startswith(".report-") or (len(p.parts) == 1 and is_output(p.name))]
    return {str(p): (out / p).read_bytes() for p in files if p not in mine}


@pytest.mark.slow  # seven reports in their own processes
def test_a_report_killed_at_any_step_leaves_the_old_outputs_or_the_new_never_a_mix(tmp_path: Path):
    """As `make table1 RECORD=1`: the runs and a README inside OUT. The old report has learning curves (the runs
    kept CSV logs) and protocol `old`; the new one none, protocol `new` and one run fewer, so every output differs
    and one goes. Killed just before a rename into OUT (the journal, the first move, one halfway), OUT holds the old
    set untouched or, past the journal, a journal the next report completes into the new set before anything else."""
    old_state = tmp_path / "old"
    _write_runs(old_state / "runs")
    (old_state / "README.md").write_text("a committed sweep's own notes\n")
    for log in old_state.glob("runs/*/*/"):
        (log / "csv" / "version_0").mkdir(parents=True)
        (log / "csv" / "version_0" / "metrics.csv").write_text("epoch,train/loss_epoch\n0,0.9\n1,0.7\n")
    args = ["--runs", str(old_state / "runs"), "--out", str(old_state), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main([*args, "--protocol", "old"]) == 0
    old = _outputs(old_state)
    assert "learning_curves.png" in old
    for logs in old_state.glob("runs/*/*/csv"):
        shutil.rmtree(logs)
    shutil.rmtree(old_state / "runs" / "msnet" / "run20")
    others = _others(old_state)

    reference = tmp_path / "reference"
    shutil.copytree(old_state, reference)
    done = _report_killed_at(0, reference, tmp_path / "renames.log", "--protocol", "new")
    assert done.returncode == 0, done.stderr[-2000:]
    new = _outputs(reference)
    assert "learning_curves.png" not in new and set(new) == set(old) - {"learning_curves.png"}
    assert [name for name in new if new[name] == old[name]] == []
    renames = [Path(line) for line in (tmp_path / "renames.log").read_text().splitlines()]
    seen = [k for k, path in enumerate(renames, start=1) if path.parent == reference]  # the renames into OUT
    for kill_at in (seen[0], seen[1], seen[len(seen) // 2]):  # just before the first, the second, one halfway
        out = tmp_path / f"killed_at_{kill_at}"
        shutil.copytree(old_state, out)
        killed = _report_killed_at(kill_at, out, tmp_path / f"{kill_at}.log", "--protocol", "new")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert _others(out) == others, "the runs and the README are never touched"
        if not (out / JOURNAL).exists():  # before the commit point: the old set, whole
            assert _outputs(out) == old, kill_at
            continue
        interrupted = out / json.loads((out / JOURNAL).read_text())["staging"]
        unmoved = len([p for p in interrupted.iterdir() if p.name != JOURNAL])
        # the next report (killed too, at its first rename after the moves left to do) first completes the new set
        again = _report_killed_at(unmoved + 1, out, tmp_path / f"{kill_at}.again.log", "--protocol", "third")
        assert again.returncode == -signal.SIGKILL, again.stderr[-2000:]
        assert "finished replacing the outputs of a report killed while it replaced them" in again.stderr
        assert not (out / JOURNAL).exists() and _outputs(out) == new, kill_at
        assert not interrupted.exists()
    assert [renames[k - 1].name for k in seen] == [JOURNAL, *sorted(new)]  # the commit point, then the moves


def test_runs_that_name_patients_differently_are_refused(tmp_path: Path, capsys):
    """A run whose patients are pseudonyms beside runs with raw ids (or another key's pseudonyms) would pair no
    patient in the patient-level comparisons: one line, naming both namings."""
    runs = tmp_path / "runs"
    _write_runs(runs)
    args = ["--runs", str(runs), "--out", str(tmp_path / "out"), "--folds", "0,1", "--seeds", "643,644"]
    assert report_main(args) == 0
    first = sorted(runs.rglob("metrics.json"))[0]
    record = json.loads(first.read_text())
    record["run"] |= {"patient_ids": "pseudonym", "pseudonym_key_id": "0123abcd"}
    first.write_text(json.dumps(record))
    assert report_main(args) == 2
    err = capsys.readouterr().err
    assert "the runs name patients differently (" in err
    assert "raw ids (e.g." in err and "pseudonyms of key 0123abcd (e.g." in err


def test_federated_runs_are_a_block_of_their_own_compared_with_ours_and_with_sepnorm():
    records = fake_records() + [
        {**r, "run": {**r["run"], "experiment": name}}
        for r in fake_records()
        if r["run"]["experiment"] == "sepnorm"
        for name in ("fedbn", "fedavg")
    ]
    predictions = [row for r in records if r["run"]["seed"] in SEEDS for row in fake_predictions(r)]
    files = render_files(build_report(records, predictions, PAPER, FOLDS, SEEDS, "last"), PROVENANCE)
    site_a = files["table1.md"].split("### Site A")[1].split("###")[0].splitlines()
    methods = [line.split(" | ")[0].lstrip("| ") for line in site_a if line.startswith("| ") and "---" not in line]
    assert methods[-3:] == ["**Federated**", "FedAvg", "FedBN"]  # after every centralised row, in row order
    assert methods.index("SepNorm + Contrastive (ours)") < methods.index("**Federated**")
    delong = list(csv.DictReader(io.StringIO(files["delong.csv"])))
    pairs = {(row["reference"], row["baseline"]) for row in delong}
    assert {("ours", "fedbn"), ("ours", "fedavg"), ("sepnorm", "fedbn"), ("sepnorm", "fedavg")} <= pairs
    assert not {pair for pair in pairs if pair[0] == "sepnorm" and pair[1] not in ("fedbn", "fedavg")}
    twins = [row for row in delong if row["reference"] == "sepnorm" and row["level"] == "images"]
    assert twins and all(int(row["n_cases"]) == 20 * len(FOLDS) and row["p"] for row in twins)  # folds pooled
    assert "each reference (SepNorm + Contrastive (ours); the federated rows also SepNorm)" in files["table1.md"]
