"""`make table1` end to end on phantom data: every row of the registry's Table I, every output, and a rerun
that runs nothing."""

import csv
import os
import subprocess
from pathlib import Path

import pytest

from covidct.experiments import table1_experiments
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # `make table1 PROTOCOL=smoke`: every experiment trained, then reported

METHODS = [e.name for e in table1_experiments(block="centralised")]  # what `make table1` sweeps


def make_table1(phantom_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    hydra_args = "model.backbone.width=0.125 data.num_workers=0 data.batch_per_site=4 data.eval_batch_size=16"
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "table1",
            "PROTOCOL=smoke",
            f"OUT={tmp_path / 'out'}",
            f"RUNS={tmp_path / 'runs'}",
            f"DATA={phantom_root}",
            f"HYDRA_ARGS={hydra_args}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_make_table1_smoke_then_rerun_runs_nothing(phantom_root: Path, tmp_path: Path):
    first = make_table1(phantom_root, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    outputs = ["table1.md", "table1.csv", "table1.tex", "ttests.csv", "intervals.csv", "delong.csv", "provenance.json"]
    outputs += [f"{kind}_{site}.png" for kind in ("roc", "reliability") for site in "AB"]
    for name in outputs:
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "table1.csv").open()))
    # both aggregations; image level on both sites, patient level on site B; five metrics and ECE
    assert len(rows) == 2 * len(METHODS) * (2 + 1) * 6
    assert list(dict.fromkeys(r["experiment"] for r in rows)) == METHODS
    assert {(r["aggregation"], r["level"]) for r in rows} == {
        (a, lv) for a in ("paper", "runs") for lv in ("images", "patients")
    }
    # every cell holds its one smoke run, unless the barely trained net left that metric undefined
    assert all(r["expected"] == "1" and int(r["n"]) + int(r["undefined"]) == 1 for r in rows)
    image_rows = [r for r in rows if r["level"] == "images" and r["metric"] != "ece"]
    assert all(r["paper_mean"] for r in image_rows), "the paper's value sits beside every image-level cell"
    intervals = list(csv.DictReader((out / "intervals.csv").open()))
    assert {(r["site"], r["level"], r["unit"]) for r in intervals} == {
        ("A", "images", "image"),
        ("B", "images", "patient"),
        ("B", "patients", "patient"),
    }
    delong = list(csv.DictReader((out / "delong.csv").open()))
    # ours vs every other method, 1 seed: site A's images, site B's images and patients
    assert {(r["site"], r["level"]) for r in delong} == {("A", "images"), ("B", "images"), ("B", "patients")}
    assert len(delong) == 3 * (len(METHODS) - 1)
    records = sorted((tmp_path / "runs").glob("*/*/metrics.json"))
    assert len(records) == len(METHODS)
    stamps = [p.stat().st_mtime_ns for p in records]
    written = {name: (out / name).read_bytes() for name in outputs}

    second = make_table1(phantom_root, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("skipping") == len(METHODS)
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert {name: (out / name).read_bytes() for name in outputs} == written  # byte-identical


def test_make_table1_stops_when_the_sweep_does_not_finish(phantom_root: Path, tmp_path: Path):
    result = subprocess.run(
        ["make", "--no-print-directory", "table1", "PROTOCOL=smoke", "FOLDS=7", f"OUT={tmp_path / 'out'}"]
        + [f"RUNS={tmp_path / 'runs'}", f"DATA={phantom_root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "fold must be an integer in 0..3, got 7" in result.stderr
    assert not (tmp_path / "out").exists(), "tables were collected from an unfinished sweep"
