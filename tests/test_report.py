"""Table I aggregation: golden files on synthetic run records, statistics by hand, and the CLI."""

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest
from PIL import Image

from covidct.records import METRIC_NAMES
from covidct.report.__main__ import main as report_main
from covidct.report.table1 import (
    TABLE1_ROWS,
    TABLE_COLUMNS,
    TTEST_COLUMNS,
    DuplicateRunError,
    collect_results,
    paired_ttests,
    to_csv,
    to_latex,
    to_markdown,
)

GOLDEN = Path(__file__).parent / "golden"
PAPER = list(csv.DictReader((Path(__file__).parents[1] / "experiments" / "paper_table1.csv").open()))
FOLDS, SEEDS = [0, 1], [643, 644]
PROVENANCE = {"protocol": "fixture", "git_commit": "0000000", "device": "cpu", "date": "2026-01-01 00:00 UTC"}


def fake_records() -> list[dict]:
    """Deterministic records: each method a level, with fold/seed/metric offsets; parallel_adapter has no
    runs at all and msnet misses one, so the table must mark both."""
    records = []
    for i, experiment in enumerate(TABLE1_ROWS):
        if experiment == "parallel_adapter":
            continue
        for f in FOLDS:
            for k, s in enumerate(SEEDS):
                if experiment == "msnet" and (f, s) == (1, 644):
                    continue
                record = {
                    site: {
                        m: 0.55
                        + 0.04 * i
                        + 0.013 * f
                        + 0.007 * k * (1 + j)
                        - 0.05 * (site == "B")
                        - 0.01 * j
                        + 0.003 * ((3 * i + 5 * f + 7 * k) % 4)
                        for j, m in enumerate(METRIC_NAMES)
                    }
                    for site in ("A", "B")
                }
                record["run"] = {"experiment": experiment, "fold": f, "seed": s, "group_by": "patient"}
                records.append(record)
    records.append({**records[0], "run": {**records[0]["run"], "seed": 999}})  # outside the sweep: ignored
    return records


def rendered() -> dict[str, str]:
    records = fake_records()
    rows = collect_results(records, PAPER, FOLDS, SEEDS)
    ttests = paired_ttests(records, FOLDS, SEEDS)
    return {
        "table1.md": to_markdown(rows, ttests, PROVENANCE),
        "table1.csv": to_csv(rows, TABLE_COLUMNS),
        "table1.tex": to_latex(rows, PROVENANCE),
        "ttests.csv": to_csv(ttests, TTEST_COLUMNS),
    }


@pytest.mark.parametrize("name", ["table1.md", "table1.csv", "table1.tex", "ttests.csv"])
def test_golden_files(name: str):
    text = rendered()[name]
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


def test_cells_are_mean_and_sample_std_over_folds_and_seeds():
    rows = collect_results(fake_records(), PAPER, FOLDS, SEEDS)
    cell = next(r for r in rows if (r["experiment"], r["site"], r["metric"]) == ("sepnorm", "B", "f1"))
    values = [
        100 * (0.55 + 0.04 * 7 + 0.013 * f + 0.007 * k * 2 - 0.05 - 0.01 + 0.003 * ((21 + 5 * f + 7 * k) % 4))
        for f in FOLDS
        for k in range(len(SEEDS))
    ]
    assert cell["n"] == 4 and cell["mean"] == pytest.approx(statistics.fmean(values))
    assert cell["std"] == pytest.approx(statistics.stdev(values))
    assert (cell["paper_mean"], cell["paper_std"]) == (75.02, 1.14)
    assert len(rows) == 9 * 2 * 5
    assert all(r["n"] == 0 and r["mean"] is None for r in rows if r["experiment"] == "parallel_adapter")
    assert all(r["n"] == 3 for r in rows if r["experiment"] == "msnet")


def test_paired_ttest_matches_the_textbook_formula():
    tests = paired_ttests(fake_records(), FOLDS, SEEDS)
    row = next(t for t in tests if (t["site"], t["metric"], t["baseline"]) == ("A", "auc", "msnet"))
    records = {(r["run"]["experiment"], r["run"]["fold"], r["run"]["seed"]): r for r in fake_records()}
    diffs = [
        100 * (records[("ours", f, s)]["A"]["auc"] - records[("msnet", f, s)]["A"]["auc"])
        for f in FOLDS
        for s in SEEDS
        if ("msnet", f, s) in records
    ]
    assert row["n_pairs"] == 3 == len(diffs)
    assert row["mean_diff"] == pytest.approx(statistics.fmean(diffs))
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))
    assert row["t"] == pytest.approx(t)
    assert all(t["n_pairs"] == 0 and t["p"] is None for t in tests if t["baseline"] == "parallel_adapter")


def test_duplicate_runs_are_refused():
    records = fake_records()
    with pytest.raises(DuplicateRunError, match="experiment=single_covidnet fold=0 seed=643"):
        collect_results([*records, records[0]], PAPER, FOLDS, SEEDS)


def test_cli_writes_every_output_from_run_folders(tmp_path: Path):
    runs = tmp_path / "runs"
    for i, record in enumerate(fake_records()):
        folder = runs / record["run"]["experiment"] / f"run{i}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(record))
        lines = ["site,file,label,prob_covid"]
        for site in ("A", "B"):
            for n in range(20):
                label = n % 2
                prob = min(1.0, max(0.0, 0.5 + (label - 0.5) * record[site]["auc"] + 0.03 * ((n * 7) % 5 - 2)))
                lines.append(f"{site},c/{n}.png,{label},{prob}")
        (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert report_main(["--runs", str(runs), "--out", str(out), "--folds", "0,1", "--seeds", "643,644"]) == 0
    for name in ("table1.md", "table1.csv", "table1.tex", "ttests.csv", "roc_A.png", "roc_B.png", "provenance.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "roc_A.png").size[0] > 300
    table = (out / "table1.md").read_text()
    assert "missing (0/4)" in table and "(3/4)*" in table and "image-level" in table
    assert report_main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_cli_logs_the_table_to_wandb_offline(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs" / "ours" / "r"
    runs.mkdir(parents=True)
    record = fake_records()[-2]
    (runs / "metrics.json").write_text(json.dumps(record))
    (runs / "predictions.csv").write_text(
        "site,file,label,prob_covid\nA,a.png,1,0.9\nA,b.png,0,0.2\nB,c.png,1,0.4\nB,d.png,0,0.6\n"
    )
    out = tmp_path / "out"
    args = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--folds", "0,1", "--seeds", "643,644", "--wandb"]
    assert report_main(args) == 0
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
