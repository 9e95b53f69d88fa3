"""A metric the test images leave undefined (one class) is stored as null with why, never as 0.0, and the
report leaves it out of the cell and says so."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from covidct.metrics import binary_metrics
from covidct.report.table1 import collect_results
from covidct.training.fit import train
from tests.helpers import FAST, compose_experiment


def test_one_class_leaves_auc_recall_and_f1_undefined():
    metrics = binary_metrics([0, 0, 0], [0.2, 0.7, 0.4])
    assert metrics["auc"] is None and metrics["recall"] is None
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["precision"] == 0.0 and metrics["f1"] == 0.0
    assert binary_metrics([1, 0], [0.1, 0.2])["precision"] is None  # nothing predicted COVID
    assert binary_metrics([1, 0], [0.5, 0.2])["precision"] is None  # 0.5 is not above torchmetrics' threshold


def test_a_test_part_with_one_class_records_null_and_the_report_marks_it(phantom_root: Path, tmp_path: Path, caplog):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    for image in sorted((root / "covid-ct" / "CT_COVID").iterdir())[1:]:  # one COVID image left on site B
        image.unlink()
    overrides = [f"data.root={root}", *FAST, "data.group_by=image", "fold=0", "data.sites=[B]"]
    overrides = [o for o in overrides if not o.startswith("data.batch_per_site")] + ["data.batch_per_site=2"]
    with caplog.at_level(logging.WARNING, logger="covidct.data"):
        train(compose_experiment("single", overrides), tmp_path / "run")
    assert "the test part holds 0 COVID and 6 non-COVID images" in caplog.text
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    result = record["test"]["last"]
    assert result["images"]["B"]["auc"] is None and result["images"]["B"]["recall"] is None
    assert "AUC needs both classes" in result["undefined"]["images/B/auc"]
    record["run"]["experiment"] = "single"
    rows = collect_results([record], [], [0], [643], aggregation="runs")
    cell = next(r for r in rows if (r["experiment"], r["site"], r["metric"]) == ("single", "B", "auc"))
    assert cell["n"] == 0 and cell["undefined"] == 1 and cell["mean"] is None


def test_a_one_class_part_logs_no_auc_and_selection_uses_the_other_sites(phantom_root: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    for image in sorted((root / "covid-ct" / "CT_COVID").iterdir())[1:]:  # site B: val and test parts one class
        image.unlink()
    overrides = [f"data.root={root}", *[o for o in FAST if not o.startswith("data.batch_per_site")]]
    overrides += ["data.batch_per_site=2", "data.group_by=image", "data.val_fraction=0.1", "trainer.max_epochs=2"]
    test = train(compose_experiment("sepnorm", overrides), tmp_path / "run")
    (log,) = (tmp_path / "run" / "csv").glob("*/metrics.csv")
    columns = log.read_text().splitlines()[0].split(",")
    assert "val/A/auc" in columns and "val/auc" in columns
    assert "val/B/auc" not in columns and "test/B/auc" not in columns  # torchmetrics would log 0
    assert "best_val_auc" in test  # selected on site A's validation AUC alone
