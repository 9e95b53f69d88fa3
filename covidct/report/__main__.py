"""`python -m covidct.report --runs DIR --out DIR`: Table I, t-tests, ROC curves and provenance from run records."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidct.data.sources import SITES
from covidct.errors import ConfigError, CovidCTError
from covidct.records import METRICS_FILE, PREDICTIONS_FILE, atomic_write_text, git_commit
from covidct.report.roc import plot_rocs, roc_curve
from covidct.report.table1 import (
    TABLE1_ROWS,
    TABLE_COLUMNS,
    TTEST_COLUMNS,
    DuplicateRunError,
    collect_results,
    paired_ttests,
    select_records,
    to_csv,
    to_latex,
    to_markdown,
)

PAPER_TABLE = Path(__file__).resolve().parents[2] / "experiments" / "paper_table1.csv"


def load_run_records(runs: Path) -> list[dict[str, Any]]:
    """Every complete run record under `runs`, with its folder under the key '_dir'."""
    records = []
    for path in sorted(Path(runs).rglob(METRICS_FILE)):
        record = json.loads(path.read_text())
        if "run" in record:
            record["_dir"] = str(path.parent)
            records.append(record)
    return records


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from err


def pooled_predictions(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """site -> experiment -> (labels, probabilities) of every selected run's test images."""
    pooled: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for record in records:
        with (Path(record["_dir"]) / PREDICTIONS_FILE).open(newline="") as fh:
            for row in csv.DictReader(fh):
                labels, probs = pooled[row["site"]].setdefault(record["run"]["experiment"], ([], []))
                labels.append(int(row["label"]))
                probs.append(float(row["prob_covid"]))
    return pooled


def write_report(runs: Path, out: Path, protocol: str, folds: list[int], seeds: list[int], wandb: bool) -> Path:
    records = load_run_records(runs)
    with PAPER_TABLE.open(newline="") as fh:
        paper = list(csv.DictReader(fh))
    try:
        selected = list(select_records(records, folds, seeds).values())
        rows = collect_results(records, paper, folds, seeds)
        ttests = paired_ttests(records, folds, seeds)
    except DuplicateRunError as err:
        raise ConfigError(f"{runs}: {err}") from err
    provenance = {
        "protocol": protocol,
        "git_commit": git_commit(),
        "run commits": ", ".join(sorted({r["run"].get("git_commit", "unknown") for r in selected})) or "none",
        "device": ", ".join(sorted({r["run"].get("device", "unknown") for r in selected})) or "none",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": f"{len(selected)} of {len(TABLE1_ROWS) * len(folds) * len(seeds)} "
        f"(9 methods x folds {folds} x seeds {seeds})",
        "group_by": ", ".join(sorted({r["run"].get("group_by", "?") for r in selected})) or "none",
    }
    if protocol == "smoke":
        provenance["note"] = (
            "smoke protocol: networks trained for 2 steps; the numbers test the pipeline, not the methods"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table1.md", to_markdown(rows, ttests, provenance))
    atomic_write_text(out / "table1.csv", to_csv(rows, TABLE_COLUMNS))
    atomic_write_text(out / "table1.tex", to_latex(rows, provenance))
    atomic_write_text(out / "ttests.csv", to_csv(ttests, TTEST_COLUMNS))
    atomic_write_text(out / "provenance.json", json.dumps(provenance, indent=2) + "\n")
    pooled = pooled_predictions(selected)
    images = {}
    for site in SITES:
        curves = {TABLE1_ROWS[e]: roc_curve(*pooled[site][e]) for e in TABLE1_ROWS if e in pooled.get(site, {})}
        images[site] = plot_rocs(curves, f"Site {site}: pooled test predictions", out / f"roc_{site}.png")
    if wandb:
        _log_to_wandb(rows, images, provenance, out)
    return out / "table1.md"


def _log_to_wandb(rows: list[dict[str, Any]], images: dict[str, Path], provenance: dict[str, Any], out: Path) -> None:
    """One W&B run (job_type table1) with the table, the ROC images and the provenance as config."""
    import wandb

    run = wandb.init(project="covidct", job_type="table1", group="table1", config=provenance, dir=str(out))
    run.log(
        {
            "table1": wandb.Table(columns=list(TABLE_COLUMNS), data=[[r[c] for c in TABLE_COLUMNS] for r in rows]),
            **{f"roc_{site}": wandb.Image(str(path)) for site, path in images.items()},
        }
    )
    run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder holding run folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="where table1.md, .csv, .tex, ttests.csv, roc_*.png go")
    parser.add_argument("--protocol", default="paper", help="name recorded in the provenance block")
    parser.add_argument("--folds", default="0,1,2,3", help="folds of the sweep (comma-separated)")
    parser.add_argument("--seeds", default="643,644,645", help="seeds of the sweep (comma-separated)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and ROC curves to W&B")
    args = parser.parse_args(argv)
    try:
        if not args.runs.is_dir():
            raise ConfigError(f"runs folder {args.runs} does not exist; run the sweep first (make table1).")
        path = write_report(
            args.runs, args.out, args.protocol, _int_list(args.folds), _int_list(args.seeds), args.wandb
        )
    except CovidCTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} and its companions in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
