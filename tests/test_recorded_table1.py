"""The committed CPU-scale Table I (experiments/table1-cpu/, issue 22): its records are read here, never
re-trained.

- Every number of table1.csv (and so of table1.md, which renders it) is recomputed from the committed
  predictions.csv files with numpy and scipy alone, not through covidct.metrics, so a record whose metrics
  disagree with its own predictions fails.
- The report regenerated from the committed records equals the committed tables byte for byte.
- `covidct.run` on a committed run's folder finds the record, trains nothing and changes no file in it, and every
  committed run's folder (the LOSO runs' too) is the one today's config names.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from covidct.experiments import table1_experiments
from covidct.report.write import write_report
from covidct.run_folder import run_id
from tests.helpers import compose_experiment

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "table1-cpu"
RUNS = RESULTS / "runs"
FEDERATED_RUNS = RESULTS.parent / "federated-cpu" / "runs"  # the Federated block's sweep (make federated)
FOLDS, SEEDS = [0, 1, 2, 3], [643]
THRESHOLD = 0.5  # P(COVID) above it predicts COVID
TEXT_OUTPUTS = (
    *("table1.md", "table1.csv", "table1.tex", "ttests.csv", "delong.csv", "intervals.csv"),
    *("claims.md", "claims.csv", "provenance.json"),
)


def _run_dirs(runs: Path = RUNS) -> list[Path]:
    return sorted(p.parent for p in runs.rglob("metrics.json"))


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Table I's five metrics and the ECE (15 equal-width bins, L1) in %, by their textbook definitions."""
    predicted = probs > THRESHOLD
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    positives, negatives = probs[labels == 1], probs[labels == 0]
    # torchmetrics' bins (`bucketize(..., right=True)` over 16 edges): a P(COVID) of exactly 1.0 (a saturated float32)
    # falls in a bin of its own past the 15th, where the textbook closes the last bin; the records' ECE is
    # torchmetrics', so it is recomputed the same way (single fold 3: 11.23 this way, 10.91 with the closed bin)
    bins = (probs * 15).astype(int)
    ece = sum(
        abs(probs[bins == b].mean() - labels[bins == b].mean()) * np.sum(bins == b) / len(probs)
        for b in range(16)
        if np.any(bins == b)
    )
    values = {
        "acc": np.mean(predicted == (labels == 1)),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "recall": tp / (tp + fn),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "auc": mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives)),
        "ece": ece,
    }
    return {name: 100 * float(value) for name, value in values.items()}


def _by_patient(rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """One case per patient (the image itself where none is known): its slices' mean P(COVID), COVID if any is."""
    patients: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        patients.setdefault(row["patient"] or f"image:{row['file']}", []).append(row)
    labels = np.array([max(int(r["label"]) for r in slices) for slices in patients.values()])
    probs = np.array([np.mean([float(r["prob_covid"]) for r in slices]) for slices in patients.values()])
    return labels, probs


def _recomputed() -> dict[tuple[str, str, str, str], list[tuple[int, int, float]]]:
    """(level, experiment, site, metric) -> [(fold, seed, value %)] from every committed predictions.csv, both
    blocks'."""
    values: dict[tuple[str, str, str, str], list[tuple[int, int, float]]] = {}
    for run_dir in [*_run_dirs(), *_run_dirs(FEDERATED_RUNS)]:
        run = json.loads((run_dir / "metrics.json").read_text())["run"]
        with (run_dir / "predictions.csv").open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["selection"] == "last"]
        for site in sorted({r["site"] for r in rows}):
            mine = [r for r in rows if r["site"] == site]
            levels = {
                "images": (np.array([int(r["label"]) for r in mine]), np.array([float(r["prob_covid"]) for r in mine]))
            }
            if any(r["patient"] for r in mine):
                levels["patients"] = _by_patient(mine)
            for level, (labels, probs) in levels.items():
                for metric, value in _metrics(labels, probs).items():
                    key = (level, run["experiment"], site, metric)
                    values.setdefault(key, []).append((int(run["fold"]), int(run["seed"]), value))
    return values


def _table_rows() -> list[dict[str, str]]:
    with (RESULTS / "table1.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_committed_sweep_is_one_code_version_at_the_cpu_protocol() -> None:
    runs = [json.loads((d / "metrics.json").read_text())["run"] for d in _run_dirs()]
    assert runs, f"no committed run records under {RUNS}"
    assert {r["protocol"]["name"] for r in runs} == {"cpu"}
    assert {int(r["seed"]) for r in runs} == set(SEEDS)
    assert {int(r["fold"]) for r in runs} <= set(FOLDS)
    assert len({r["git_commit"] for r in runs}) == 1, "the sweep must run from one pinned commit"
    keys = [(r["experiment"], int(r["fold"]), int(r["seed"])) for r in runs]
    assert len(keys) == len(set(keys)), "one record per experiment, fold and seed"
    expected = {(e.name, f, s) for e in table1_experiments(block="centralised") for f in FOLDS for s in SEEDS}
    assert set(keys) == expected, f"the sweep is 9 experiments x 4 folds: missing {sorted(expected - set(keys))}"
    assert not list(RUNS.rglob("*.ckpt")), "checkpoints are not committed"


def test_the_committed_federated_block_is_one_code_version_with_every_method_in_each_of_its_folds() -> None:
    runs = [json.loads((d / "metrics.json").read_text())["run"] for d in _run_dirs(FEDERATED_RUNS)]
    assert runs, f"no committed run records under {FEDERATED_RUNS}"
    assert {r["protocol"]["name"] for r in runs} == {"cpu"} and {int(r["seed"]) for r in runs} == set(SEEDS)
    assert len({r["git_commit"] for r in runs}) == 1, "the sweep must run from one pinned commit"
    keys = [(r["experiment"], int(r["fold"])) for r in runs]
    folds = {fold for _, fold in keys}
    assert folds <= set(FOLDS) and len(keys) == len(set(keys))
    methods = [e.name for e in table1_experiments(block="federated")]
    assert set(keys) == {(method, fold) for method in methods for fold in folds}, "every method in each fold"
    assert not list(FEDERATED_RUNS.rglob("*.ckpt")) and not list(FEDERATED_RUNS.rglob("federated")), "no states"


def test_every_number_of_table1_is_recomputed_from_the_committed_predictions() -> None:
    recomputed = _recomputed()
    checked = set()
    for row in _table_rows():
        if row["selection"] != "last":
            continue
        runs = recomputed.get((row["level"], row["experiment"], row["site"], row["metric"]), [])
        values = [v for _, _, v in runs if not math.isnan(v)]
        if row["aggregation"] == "runs":
            expected_mean = np.mean(values) if values else None
            expected_std = np.std(values, ddof=1) if len(values) > 1 else None
        else:  # "paper": per seed the mean over its folds (all of them), then mean (and std) over seeds
            folds = {seed: [v for _, s, v in runs if s == seed and not math.isnan(v)] for seed in SEEDS}
            per_seed = [np.mean(v) for v in folds.values() if len(v) == len(FOLDS)]
            expected_mean = np.mean(per_seed) if per_seed else None
            expected_std = np.std(per_seed, ddof=1) if len(per_seed) > 1 else None
        assert int(row["n"]) == (len(values) if row["aggregation"] == "runs" else len(per_seed)), row
        if expected_mean is None:
            assert row["mean"] == "", row
            continue
        assert float(row["mean"]) == pytest.approx(expected_mean, abs=0.006), row
        if expected_std is not None:
            assert float(row["std"]) == pytest.approx(expected_std, abs=1e-3), row
        if row["aggregation"] == "runs":
            checked.add((row["level"], row["experiment"], row["site"], row["metric"]))
    defined = {key for key, runs in recomputed.items() if any(not math.isnan(v) for _, _, v in runs)}
    assert checked == defined, "table1.csv holds a cell for every metric the predictions define, and no other"


def _six_digit_bounds(value: float) -> tuple[float, float]:
    """The ends of the interval of numbers a 6-significant-digit CSV cell `value` can stand for."""
    half = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 5) if value else 0.0
    return value - half, value + half


def test_table1_md_shows_the_csv_numbers() -> None:
    text = (RESULTS / "table1.md").read_text()
    for row in _table_rows():
        if row["aggregation"] == "runs" and row["mean"] and row["std"]:
            # the CSV keeps 6 significant digits: a value at a rounding edge (65.655) may show either way
            shown = {
                f"{mean:.2f} ± {std:.2f}"
                for mean in _six_digit_bounds(float(row["mean"]))
                for std in _six_digit_bounds(float(row["std"]))
            }
            assert any(cell in text for cell in shown), row


@pytest.mark.slow
def test_the_report_regenerates_byte_identically_from_the_committed_records(tmp_path: Path) -> None:
    write_report([RUNS, FEDERATED_RUNS], tmp_path, "cpu", FOLDS, SEEDS)  # make table1's: both blocks
    for name in TEXT_OUTPUTS:
        assert (tmp_path / name).read_bytes() == (RESULTS / name).read_bytes(), name
    for figure in ("roc_A.png", "roc_B.png", "reliability_A.png", "reliability_B.png", "learning_curves.png"):
        assert (RESULTS / figure).is_file() and (tmp_path / figure).is_file(), figure


def test_the_loso_report_regenerates_byte_identically_from_its_committed_records(tmp_path: Path) -> None:
    loso = RESULTS.parent / "loso-cpu"
    runs = [json.loads(p.read_text())["run"] for p in sorted((loso / "runs").rglob("metrics.json"))]
    held = {(run["experiment"], *run["splits"]["test_sites"]) for run in runs}
    assert len(runs) == 8 and held == {(e, site) for e in ("ours", "sepnorm", "joint", "single") for site in "AB"}
    write_report(loso / "runs", tmp_path, "cpu", [0], SEEDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loso.csv", "loso.md", "provenance.json"]
    for name in ("loso.md", "loso.csv", "provenance.json"):
        assert (tmp_path / name).read_bytes() == (loso / name).read_bytes(), name


@pytest.mark.real_data
def test_a_committed_run_is_found_and_nothing_in_it_changes(real_data: Path, tmp_path: Path) -> None:
    source = _run_dirs()[-1]
    runs = tmp_path / "runs"
    shutil.copytree(source, runs / source.parent.name / source.name)
    before = {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    run = json.loads((source / "metrics.json").read_text())["run"]
    command = [
        *(sys.executable, "-m", "covidct.run", "-m", f"fold={run['fold']}", f"seed={run['seed']}"),
        *(f"experiment={run['experiment']}", "+protocol=cpu", "split_seed=0"),
        *(f"data.root={real_data}", f"paths.log_dir={runs}"),
    ]  # the sweep's command (make table1 PROTOCOL=cpu SEEDS=643) for this one run
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping" in done.stdout + done.stderr
    after = {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    ignored = {Path("multirun.yaml"), Path(source.parent.name) / source.name / ".lock"}
    assert {k: v for k, v in after.items() if k not in ignored} == before


def test_training_losses_come_from_the_csv_log_and_a_resumed_attempt_overrides(tmp_path: Path) -> None:
    from covidct.records import read_training_losses

    header = "epoch,step,train/loss_epoch,train/loss_step\n"
    first, second = tmp_path / "csv" / "version_0", tmp_path / "csv" / "version_1"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "metrics.csv").write_text(header + "0,9,,1.5\n0,9,1.2,\n1,19,1.0,\n2,29,0.9,\n")
    (second / "metrics.csv").write_text(header + "2,29,0.8,\n3,39,0.7,\n")  # resumed from epoch 2
    assert read_training_losses(tmp_path) == [1.2, 1.0, 0.8, 0.7]
    assert read_training_losses(tmp_path / "elsewhere") == []


@pytest.mark.slow
def test_every_committed_run_keeps_its_id_under_todays_config() -> None:
    """make table1 / make loso find a committed run by its folder's id, the hash of its semantic config: a
    renamed class or a new option must leave it as it was (covidct/run_folder.py: INERT_DEFAULTS, RECORDED_TARGETS)."""
    loso = sorted(p.parent for p in (RESULTS.parent / "loso-cpu" / "runs").rglob("metrics.json"))
    federated = _run_dirs(FEDERATED_RUNS)
    for folder in [*_run_dirs(), *loso, *federated]:
        run = json.loads((folder / "metrics.json").read_text())["run"]
        held = run["splits"].get("test_sites", [])
        overrides = [f"fold={run['fold']}", f"seed={run['seed']}", "+protocol=cpu", "split_seed=0"]
        overrides += [f"data.test_sites=[{','.join(held)}]"] if held else []
        overrides += ["patient_ids=raw"] if held or folder in federated else []  # as these sweeps ran
        cfg = compose_experiment(run["experiment"], overrides)
        assert f"fold{run['fold']}-seed{run['seed']}-{run_id(_root_=cfg)}" == folder.name, folder
