"""A report's files from a folder of run records: every record read and checked, Table I and its statistics,
the leave-one-site-out table, the figures and the provenance, published together (`python -m covidct.report`
is its command line)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidct.atomic import atomic_write_text
from covidct.data.sites import dataset_name
from covidct.errors import ConfigError, DataError
from covidct.records import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    TIMING_FILE,
    held_out_sites,
    read_predictions,
    read_run_record,
    read_training_losses,
)
from covidct.report.curves import plot_learning_curves, plot_reliability, plot_rocs
from covidct.report.loso import LOSO_COLUMNS, loso_markdown, loso_rows
from covidct.report.publish import replaced_outputs
from covidct.report.recompute import check_cache
from covidct.report.render import build_report, curve_caption, provenance_json, render_files
from covidct.report.table1 import (
    DEFAULT_REFERENCE,
    TABLE_COLUMNS,
    DuplicateRunError,
    fold_caveats,
    record_sites,
    select_records,
    to_csv,
)
from covidct.report.validate import (
    check_patient_naming,
    check_predictions,
    check_record,
    check_sections,
    is_evaluation,
)

PAPER_TABLE = Path(__file__).resolve().parents[2] / "experiments" / "paper_table1.csv"


class UnusableRun(ValueError):
    """A run folder the report cannot count; the message begins with the file at fault and says why."""


def load_run_records(runs: Sequence[Path], skip_broken: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Every complete run record under the folders `runs`, with its folder under '_dir', its checked predictions under
    '_predictions' and its finishing time (from timing.json, where present) under '_finished_at'; and, with
    `skip_broken`, the unusable ones left out (`read_run`), each as 'file why'. Without it they stop the report
    with an error that names the file."""
    records, broken = [], []
    for path in sorted(path for folder in runs for path in Path(folder).rglob(METRICS_FILE)):
        try:
            record = read_run(path.parent)
        except UnusableRun as err:
            if not skip_broken:
                raise DataError(
                    f"{err}; rerun or delete that run, or pass --skip-broken to leave it out (its cells are then "
                    "marked as missing)."
                ) from None
            broken.append(str(err))
            continue
        if record is not None:
            records.append(record)
    check_patient_naming(records)
    return records, broken


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's record, checked (`covidct.report.validate`): its metrics.json holds what the tables read and
    its predictions.csv the whole test part the record counts; its metrics are then recomputed from the
    predictions, the recorded ones a cache that must agree (`covidct.report.recompute`). None for
    covidct.evaluate's records (e.g. under a run's folder: a checkpoint on other data, not a sweep's run);
    UnusableRun names the file that is not usable."""
    path = run_dir / METRICS_FILE
    try:
        record = read_run_record(run_dir)
        check_sections(record)
        if is_evaluation(record):
            return None
        check_record(record)
    except (OSError, ValueError) as err:
        raise UnusableRun(f"{path} is not a usable run record ({err})") from None
    predictions = run_dir / PREDICTIONS_FILE
    if not predictions.is_file():
        raise UnusableRun(f"{path} is not a usable run record (its {PREDICTIONS_FILE} is missing)")
    try:
        rows = read_predictions(predictions)
    except DataError as err:
        raise UnusableRun(str(err).rstrip(".")) from None
    try:
        check_predictions(record, rows)
    except ValueError as err:
        raise UnusableRun(f"{predictions} does not match its run record {path.name} ({err})") from None
    try:
        record = {**record, "test": check_cache(record, rows)}  # the tables read the predictions' metrics
    except ValueError as err:
        raise UnusableRun(f"{path} does not match its {PREDICTIONS_FILE} ({err})") from None
    timing = run_dir / TIMING_FILE
    try:
        finished = json.loads(timing.read_text()).get("finished_at") if timing.is_file() else None
        if finished is not None and not isinstance(finished, str):
            raise ValueError(f"finished_at is {finished!r}, not a time")
    except (OSError, ValueError, AttributeError) as err:
        raise UnusableRun(f"{timing} is not a usable timing record ({err})") from None
    return {**record, "_dir": str(run_dir), "_predictions": rows, "_finished_at": finished}


def run_predictions(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every selected run's test predictions, each row tagged with its run's experiment, fold and seed."""
    rows = []
    for record in records:
        run = record["run"]
        tag = {"experiment": run["experiment"], "fold": int(run["fold"]), "seed": int(run["seed"])}
        rows += [{**row, **tag} for row in record["_predictions"]]
    return rows


def learning_curves(records: Sequence[dict[str, Any]], methods: dict[str, str]) -> dict[str, list[list[float]]]:
    """Each method's runs' epoch-mean training losses (method label -> one list per run), in table order; runs
    that kept no CSV log are left out."""
    curves: dict[str, list[list[float]]] = {}
    for experiment, label in methods.items():
        runs = [r for r in records if r["run"]["experiment"] == experiment]
        losses = [read_training_losses(Path(r["_dir"])) for r in sorted(runs, key=lambda r: r["_dir"])]
        if any(losses):
            curves[label] = [run for run in losses if run]
    return curves


def _joined(records: Sequence[dict[str, Any]], key: str, absent: str) -> str:
    """The records' distinct values of run.<key>, joined for the provenance ('none' without records)."""
    return ", ".join(sorted({str(r["run"].get(key, absent)) for r in records})) or "none"


def write_report(
    runs: Path | Sequence[Path],
    out: Path,
    protocol: str,
    folds: list[int],
    seeds: list[int],
    selection: str = "last",
    pooling: str = "mean",
    wandb: str | None = None,
    skip_broken: bool = False,
    reference: str = DEFAULT_REFERENCE,
) -> Path:
    folders = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(folder) for folder in runs]  # one, or several
    where = ", ".join(map(str, folders))
    records, broken = load_run_records(folders, skip_broken)
    with PAPER_TABLE.open(newline="") as fh:
        paper = list(csv.DictReader(fh))
    try:
        selected = list(select_records(records, folds, seeds).values())
    except DuplicateRunError as err:
        raise ConfigError(f"{where}: {err}") from err
    predictions = run_predictions(selected)
    report = build_report(records, predictions, paper, folds, seeds, selection, pooling, reference=reference)
    methods = report["methods"]  # every row of the table, Table I's and those after it
    if reference not in methods:
        raise ConfigError(
            f"--reference {reference}: no such experiment in the table (its rows: {', '.join(methods)}); name one of "
            "them."
        )
    wanted = {(f, s) for f in folds for s in seeds}
    loso = [r for r in records if held_out_sites(r) and (int(r["run"]["fold"]), int(r["run"]["seed"])) in wanted]
    table1 = bool(selected) or not loso  # a runs folder of leave-one-site-out runs alone gets their table alone
    counted = selected if table1 else loso  # the runs the provenance describes
    finished = sorted(r["_finished_at"] for r in counted if r.get("_finished_at"))
    provenance = {
        "protocol": protocol,
        "selection": selection,
        "run commits": _joined(counted, "git_commit", "unknown"),
        "device": _joined(counted, "device", "unknown"),
        "date": finished[-1] if finished else "unknown",  # the newest record's: reruns give the same file
        "runs": f"{len(selected)} of {len(methods) * len(folds) * len(seeds)} "
        f"({len(methods)} methods x folds {folds} x seeds {seeds})"
        if table1
        else f"{len(loso)} leave-one-site-out runs (folds {folds} x seeds {seeds})",
        "group_by": _joined(counted, "group_by", "?"),
        "split_seed": _joined(counted, "split_seed", "?"),
        "patient pooling": report["patient_pooling"],
        **({"reference (t-tests, DeLong)": reference} if table1 else {}),
    }
    caveats = fold_caveats(counted)
    if caveats:
        provenance["fold caveat"] = "; ".join(caveats)
    if broken:
        provenance["left out (broken records)"] = "; ".join(broken)
    if protocol == "smoke":
        provenance["note"] = (
            "smoke protocol: networks trained for 2 steps; the numbers test the pipeline, not the methods"
        )
    texts = render_files(report, provenance) if table1 else {"provenance.json": provenance_json(provenance)}
    if any(held_out_sites(r) for r in records):  # leave-one-site-out records: their own table beside Table I
        try:
            rows = loso_rows(records, folds, seeds, selection)
        except DuplicateRunError as err:
            raise ConfigError(f"{where}: {err}") from err
        texts |= {"loso.md": loso_markdown(rows), "loso.csv": to_csv(rows, LOSO_COLUMNS)}
    with replaced_outputs(out) as staging:
        for name, text in texts.items():
            atomic_write_text(staging / name, text)
        images = draw_figures(staging, report, provenance, selected) if table1 else {}
    if wandb:
        rows = [row for table in report["tables"].values() for row in table]
        figures = {name: out / path.name for name, path in images.items()}  # where they now are
        _log_to_wandb(rows, figures, provenance, out, wandb == "online")
    return out / ("table1.md" if table1 else "loso.md")


def draw_figures(
    folder: Path, report: dict[str, Any], provenance: dict[str, Any], selected: Sequence[dict[str, Any]]
) -> dict[str, Path]:
    """The ROC and reliability figures of each site and the learning curves, into `folder`, by name."""
    methods, protocol = report["methods"], provenance["protocol"]
    images = {}
    for site in record_sites(selected, report["selection"]):
        dataset = f"Site {site}: {dataset_name(site, selected)}"
        caption = curve_caption(report, site, (protocol, provenance.get("note")))
        rocs = {methods[e]: curve for (e, s), curve in report["rocs"].items() if s == site}
        images[f"roc_{site}"] = plot_rocs(
            rocs, f"{dataset}\nROC of pooled test predictions", folder / f"roc_{site}.png", caption
        )
        bins = {methods[e]: b for (e, s), b in report["reliability"].items() if s == site}
        images[f"reliability_{site}"] = plot_reliability(
            bins, f"{dataset}\nreliability of pooled test predictions", folder / f"reliability_{site}.png", caption
        )
    curves = learning_curves(selected, methods)
    if curves:
        images["learning_curves"] = plot_learning_curves(
            curves,
            "Training loss per epoch (both sites' batches)",
            folder / "learning_curves.png",
            f"{protocol} protocol; {provenance['runs']}. From each run's CSV log (train/loss_epoch); a method's losses "
            "differ in their terms (e.g. ours adds the contrastive term), so compare shapes, not levels.",
        )
    return images


def _log_to_wandb(
    rows: list[dict[str, Any]], images: dict[str, Path], provenance: dict[str, Any], out: Path, online: bool
) -> None:
    """One W&B run (job_type table1) with the table, the ROC images and the provenance as config; offline (under
    OUT/wandb, for `wandb sync`) unless `online`."""
    import wandb

    mode = "online" if online else "offline"  # the network only when asked (--wandb online)
    run = wandb.init(project="covidct", job_type="table1", group="table1", config=provenance, dir=str(out), mode=mode)
    run.log(
        {
            "table1": wandb.Table(columns=list(TABLE_COLUMNS), data=[[r[c] for c in TABLE_COLUMNS] for r in rows]),
            **{name: wandb.Image(str(path)) for name, path in images.items()},
        }
    )
    run.finish()
    wandb.teardown()  # forget this process's W&B settings: a later run (a logger=wandb training) reads its own
