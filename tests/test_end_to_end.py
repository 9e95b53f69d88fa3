"""The CLI as a user runs it: a two-fold `ours` multirun on the real data, CPU-sized."""

import csv
import json
from pathlib import Path

import pytest

from covidct.data.sources import scan_site
from covidct.metrics import STATISTICS
from covidct.pseudonyms import Pseudonyms
from covidct.records import read_predictions
from tests.helpers import run_cli


def test_ours_multirun_on_real_data_writes_run_records(real_data: Path, tmp_path: Path):
    result = run_cli(
        [
            "+experiment=ours",  # the form earlier versions documented: still accepted
            "fold=0,1",
            f"data.root={real_data}",
            "data.image_size=64",
            "data.num_workers=2",
            "model.backbone.width=0.25",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "-m",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted(tmp_path.glob("ours/fold*-seed643-*/metrics.json"))
    assert len(records) == 2, result.stdout[-2000:]
    test_files = []
    for path, fold in zip(records, (0, 1)):
        record = json.loads(path.read_text())
        assert record["run"]["fold"] == fold and record["run"]["experiment"] == "ours"
        assert record["run"]["global_steps"] == 3
        timing = json.loads(path.with_name("timing.json").read_text())["train_epochs"]
        assert [(e["epoch"], e["images"]) for e in timing] == [(0, 3 * 32)] and timing[0]["img_per_s"] > 0
        assert any("image-level" in note for note in record["run"]["splits"]["notes"])
        for site in ("A", "B"):
            metrics = record["test"]["last"]["images"][site]
            assert set(metrics) == set(STATISTICS) and all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
        predictions = read_predictions(path.parent)
        sites = record["run"]["splits"]["sites"]
        assert len(predictions) == sites["A"]["test"]["images"] + sites["B"]["test"]["images"]
        assert all(p["patient"] for p in predictions if p["site"] == "B" and p["label"] == 0)  # all mapped
        # the record names site B's patients by keyed pseudonyms, never by the ids of Meta/patients.csv
        table = {r["patient_id"] for r in csv.DictReader((real_data / "covid-ct" / "Meta" / "patients.csv").open())}
        raw = {s.patient for s in scan_site(real_data, "B") if s.patient}  # those ids, as the data layer keys them
        shown = {p["patient"] for p in predictions if p["site"] == "B" and p["patient"]}
        assert record["run"]["patient_ids"] == "pseudonym" and shown and not shown & (raw | table)
        assert not any(patient in p["file"] for p in predictions for patient in table)
        assert shown <= {Pseudonyms().patient(patient) for patient in raw}  # the session's key (conftest)
        assert not any(p["patient"] for p in predictions if p["site"] == "A")  # site A has no patient ids
        test_files.append({(p["site"], p["file"]) for p in predictions})
    assert not test_files[0] & test_files[1], "folds 0 and 1 share test images"
    assert 600 < sites["A"]["test"]["images"] < 640 and 170 < sites["B"]["test"]["images"] < 205


def test_missing_data_root_is_one_clear_line(tmp_path: Path):
    result = run_cli(["experiment=ours", f"data.root={tmp_path / 'nowhere'}", "trainer.max_epochs=1"], tmp_path)
    assert result.returncode == 2
    assert "error: data root" in result.stderr and "covidct.data download" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_data_root_that_is_a_file_is_one_clear_line(tmp_path: Path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    result = run_cli(["experiment=ours", f"data.root={tmp_path / 'data.zip'}", "trainer.max_epochs=1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file, not a directory" in result.stderr


def test_a_log_dir_under_a_file_is_one_clear_line(tmp_path: Path):
    (tmp_path / "afile").write_text("x")
    result = run_cli(["experiment=ours", f"data.root={tmp_path}"], tmp_path / "afile" / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lies under" in result.stderr and "which is a file: choose a folder" in result.stderr
