"""Run records: metrics.json (test metrics per checkpoint selection, plus identity) and predictions.csv,
written atomically.

metrics.json is written last, so a run directory holding it is a complete record.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidct.atomic import atomic_write_text
from covidct.csvfiles import csv_text, plain_cell
from covidct.errors import ConfigError, DataError

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
TIMING_FILE = "timing.json"  # throughput and finishing time, beside the record (`covidct.timing`)
PREDICTION_COLUMNS = ("selection", "site", "file", "patient", "label", "prob_covid")
EVALUATION = "evaluate"  # run.experiment of a `covidct.evaluate` record: a checkpoint evaluated, not a sweep's run
UNSEEN_COLUMN = "unseen_norm"  # leave-one-site-out records only: the norms an unseen site's row was classified with


def git_commit() -> str:
    """Commit of the code that ran, '+dirty' when the working tree differs from it.

    A copy without .git (a container, a remote GPU machine) can name it in COVIDCT_GIT_COMMIT.
    """
    if os.environ.get("COVIDCT_GIT_COMMIT"):
        return os.environ["COVIDCT_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_run_record(
    output_dir: Path,
    test: Mapping[str, Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any],
    config: Mapping[str, Any],
) -> Path:
    """predictions.csv, then metrics.json.

    metrics.json: {"test": {selection: {"checkpoint", "epoch", "images": {site: metrics},
    "patients": {site: metrics}}}, "run": {identity}, "config": {...}}, one entry per checkpoint selection
    the run can offer ('last'; with a validation part also 'best_val_auc'), chosen between at report time.
    """
    output_dir = Path(output_dir)
    columns = PREDICTION_COLUMNS + ((UNSEEN_COLUMN,) if any(UNSEEN_COLUMN in row for row in predictions) else ())
    atomic_write_text(output_dir / PREDICTIONS_FILE, csv_text(predictions, columns))
    record = {"test": dict(test), "run": dict(run), "config": dict(config)}
    path = output_dir / METRICS_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """A run's predictions.csv (the file, or the run folder holding it), typed: label int, probability float."""
    path = Path(path)
    path = path / PREDICTIONS_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no predictions file {path}: pass a run's predictions.csv.")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(PREDICTION_COLUMNS) <= set(reader.fieldnames):
            found = reader.fieldnames
            raise DataError(f"{path} must have the columns {', '.join(PREDICTION_COLUMNS)}; found {found}.")
        try:
            return [
                {
                    UNSEEN_COLUMN: "",
                    **{key: plain_cell(value) for key, value in row.items()},
                    "label": int(row["label"]),
                    "prob_covid": float(row["prob_covid"]),
                }
                for row in reader
            ]
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None


def held_out_sites(record: Mapping[str, Any]) -> list[str]:
    """The sites a run never trained on but tested (leave-one-site-out, data.test_sites); [] for other runs."""
    return list(record.get("run", {}).get("splits", {}).get("test_sites", []))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's metrics.json as written; OSError or ValueError (JSON) when it cannot be read."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


TRAINING_LOG = Path("csv")  # <run>/csv/version_<attempt>/metrics.csv: the CSV logger's (conf/logger/csv.yaml)


def read_training_losses(run_dir: Path, term: str = "loss") -> list[float]:
    """A run's epoch-mean training loss (`train/<term>_epoch`, as logged) per epoch, from its CSV logs; a resumed
    run's later attempt (version) overrides the epochs an earlier one logged. [] where the run kept no CSV log
    (logger=wandb or none); DataError names a log that cannot be read."""
    by_epoch: dict[int, float] = {}
    column = f"train/{term}_epoch"
    logs = sorted(
        (p for p in (Path(run_dir) / TRAINING_LOG).glob("version_*/metrics.csv") if p.parent.name[8:].isdigit()),
        key=lambda p: int(p.parent.name[8:]),
    )  # the logger's attempts in order; any other folder there is not one of its logs
    for path in logs:
        try:
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get(column) and row.get("epoch"):
                        by_epoch[int(row["epoch"])] = float(row[column])
        except (OSError, ValueError) as err:
            raise DataError(f"{path} cannot be read as a training log ({err}); delete it or rerun the run.") from None
    return [by_epoch[e] for e in sorted(by_epoch)]
