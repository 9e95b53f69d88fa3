"""Table I from run records: pure functions from records to tables, t-tests and their renderings.

Like DomainBed's collect_results and model_selection: nothing here reads files or trains; the CLI
(`python -m covidct.report`) feeds it run records and writes what it returns. The checkpoint selection
(`last`, `best_val_auc`) is chosen here, at report time, from what every run recorded.

Two aggregations of the runs of a method and site:
- `paper`, as the paper reports: per seed, the 4-fold estimate (the mean of that seed's folds); then
  mean and sample std over seeds, t-tests paired by seed (n = seeds). A seed missing a fold is left out.
- `runs`: mean and sample std over every fold x seed run, t-tests paired by (fold, seed) (n = runs).

The rows (which methods, their labels and order, their paper key) come from the records themselves: each
run record's `config.table1` (its experiment's `table1` block), or for records without one (older
records) the experiment registry (`covidct.experiments`). Table I's rows are sorted by row and always
shown (a method with no runs is a visible gap); an experiment without a row follows them, under its name.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scipy import stats

from covidct.csvfiles import csv_text
from covidct.data.sites import site_from_dict
from covidct.errors import ConfigError
from covidct.experiments import BLOCKS, Experiment, parse_table1, registry, sort_experiments
from covidct.metrics import ECE_BINS, METRIC_NAMES, STATISTICS
from covidct.records import held_out_sites

# The experiment the t-tests and DeLong's test compare every other row with unless the report is given
# another (`--reference`): the paper's method.
DEFAULT_REFERENCE = "ours"
SELECTIONS = ("last", "best_val_auc")
AGGREGATIONS = ("paper", "runs")
METRIC_LABELS = {"acc": "Acc", "f1": "F1", "recall": "Recall", "precision": "Precision", "auc": "AUC", "ece": "ECE"}
TTEST_METRICS = ("auc", "acc")
TABLE_COLUMNS = (
    "selection",
    "aggregation",
    "level",
    "experiment",
    "method",
    "site",
    "metric",
    "n",
    "expected",
    "undefined",
    "mean",
    "std",
    "paper_mean",
    "paper_std",
)
TTEST_COLUMNS = (
    "selection",
    "aggregation",
    "site",
    "metric",
    "reference",
    "baseline",
    "n_pairs",
    "mean_diff",
    "t",
    "p",
)
AGGREGATION_TEXT = {
    "paper": "per seed the 4-fold estimate (mean over folds), then mean ± sample std over seeds (n = seeds)",
    "runs": "mean ± sample std over every fold x seed run (n = runs)",
}


class DuplicateRunError(ValueError):
    """Two records claim the same (experiment, fold, seed): the table would silently pick one."""


def _key(record: Mapping[str, Any]) -> tuple[str, int, int]:
    run = record["run"]
    return run["experiment"], int(run["fold"]), int(run["seed"])


def select_records(
    records: Iterable[Mapping[str, Any]], folds: Sequence[int], seeds: Sequence[int]
) -> dict[tuple[str, int, int], Mapping[str, Any]]:
    """The records of the sweep's folds and seeds, one per (experiment, fold, seed), of every experiment
    (those without a Table I row too); records of other folds or seeds, and leave-one-site-out records (their
    own table, report/loso.py), are ignored."""
    wanted = {(f, s) for f in folds for s in seeds}
    chosen: dict[tuple[str, int, int], Mapping[str, Any]] = {}
    for record in records:
        key = _key(record)
        if key[1:] not in wanted or held_out_sites(record):
            continue
        if key in chosen:
            raise DuplicateRunError(
                f"two run records for experiment={key[0]} fold={key[1]} seed={key[2]}; keep one per "
                "configuration in the runs folder (or give each sweep its own OUT)."
            )
        chosen[key] = record
    return chosen


def record_experiment(record: Mapping[str, Any], known: Mapping[str, Experiment]) -> Experiment:
    """A record's experiment and Table I row: its own `config.table1` where its config holds one (null: no
    row), else the registry's entry (`known`), else no row."""
    name = record["run"]["experiment"]
    config = record.get("config") or {}
    if "table1" in config:
        where = record.get("_dir") or f"run record of {name} fold={record['run'].get('fold')}"
        return parse_table1(name, config["table1"], f"{where} (config.table1)")
    return known.get(name, Experiment(name))


def table_methods(
    records: Iterable[Mapping[str, Any]], experiments: Sequence[Experiment] | None = None
) -> list[Experiment]:
    """The table's rows in order: every Table I experiment of the registry `experiments` (default: the
    repo's) and every experiment the records hold, as `record_experiment` says; Table I's by row, then the
    others by name. The federated block's experiments are rows only where records hold them: a table of
    centralised runs gains no empty block. Records of one experiment that disagree on its row are a ConfigError."""
    known = {e.name: e for e in (registry() if experiments is None else experiments)}
    methods = {e.name: e for e in known.values() if e.in_table1 and e.block == BLOCKS[0]}  # federated: with runs
    seen: dict[str, Experiment] = {}
    for record in records:
        experiment = record_experiment(record, known)
        if seen.setdefault(experiment.name, experiment) != experiment:
            raise ConfigError(
                f"the run records of {experiment.name} disagree on its Table I row: {seen[experiment.name]} and "
                f"{experiment}; rerun the older runs (or report them apart)"
            )
        methods[experiment.name] = experiment
    return sort_experiments(methods.values())


def site_metrics(record: Mapping[str, Any], selection: str, level: str, site: str) -> Mapping[str, float] | None:
    """A run's test metrics of one site under a checkpoint selection, or None where it has none."""
    return record.get("test", {}).get(selection, {}).get(level, {}).get(site)


def cell_values(
    chosen: Mapping[tuple[str, int, int], Mapping[str, Any]],
    experiment: str,
    site: str,
    metric: str,
    folds: Sequence[int],
    seeds: Sequence[int],
    selection: str,
    aggregation: str,
    level: str = "images",
) -> dict[Any, float]:
    """What a cell aggregates, in %, keyed by what pairs it with another method: (fold, seed) or seed."""
    per_run = {}
    for (e, f, s), record in chosen.items():
        values = site_metrics(record, selection, level, site) if e == experiment else None
        if values is not None and values.get(metric) is not None and not math.isnan(values[metric]):
            per_run[(f, s)] = 100.0 * values[metric]
    if aggregation == "runs":
        return per_run
    return {s: statistics.fmean(per_run[(f, s)] for f in folds) for s in seeds if all((f, s) in per_run for f in folds)}


def undefined_count(
    chosen: Mapping[tuple[str, int, int], Mapping[str, Any]],
    experiment: str,
    site: str,
    metric: str,
    selection: str,
    level: str,
) -> int:
    """Runs whose record holds the metric as undefined (null: e.g. a test part with one class)."""
    found = (site_metrics(r, selection, level, site) for (e, _, _), r in chosen.items() if e == experiment)
    return sum(1 for values in found if values is not None and metric in values and values[metric] is None)


def expected_count(folds: Sequence[int], seeds: Sequence[int], aggregation: str) -> int:
    return len(seeds) if aggregation == "paper" else len(folds) * len(seeds)


def record_sites(records: Iterable[Mapping[str, Any]], selection: str = "last", level: str = "images") -> list[str]:
    """The sites the records test at a level, in the order their runs list them (data.sites), then by name."""
    records = list(records)
    found = {site for r in records for site in r.get("test", {}).get(selection, {}).get(level, {})}
    listed = [site for r in records for site in (r["run"].get("sites") or {})]
    order = {site: k for k, site in reversed(list(enumerate(listed)))}  # each site's first place in a run's list
    return sorted(found, key=lambda site: (order.get(site, len(order)), site))


def collect_results(
    records: Iterable[Mapping[str, Any]],
    paper: Iterable[Mapping[str, Any]],
    folds: Sequence[int],
    seeds: Sequence[int],
    selection: str = "last",
    aggregation: str = "paper",
    level: str = "images",
    experiments: Sequence[Experiment] | None = None,
) -> list[dict[str, Any]]:
    """One row per (experiment, site, metric): mean and sample std in %, with n and the expected n; the
    experiments in `table_methods` order (`experiments`: the registry for records without `config.table1`).

    Rows with no runs stay in the table with n = 0 and empty statistics, so a gap is visible. The paper's
    values (by the experiment's `paper` key) sit beside image-level rows (the paper reports no patient-level
    results). Each row also says its Table I `row` (None: none; not a CSV column).
    """
    chosen = select_records(records, folds, seeds)
    paper_values = {(p["experiment"], p["site"], p["metric"]): p for p in paper} if level == "images" else {}
    expected = expected_count(folds, seeds, aggregation)
    rows = []
    for method in table_methods(chosen.values(), experiments):
        experiment = method.name
        for site in record_sites(chosen.values(), selection, level):
            for metric in STATISTICS:
                values = list(
                    cell_values(chosen, experiment, site, metric, folds, seeds, selection, aggregation, level).values()
                )
                reference = paper_values.get((method.paper, site, metric), {}) if method.paper else {}
                rows.append(
                    {
                        "selection": selection,
                        "aggregation": aggregation,
                        "level": level,
                        "experiment": experiment,
                        "method": method.method,
                        "row": method.row,
                        "block": method.block,
                        "site": site,
                        "metric": metric,
                        "n": len(values),
                        "expected": expected,
                        "undefined": undefined_count(chosen, experiment, site, metric, selection, level),
                        "mean": statistics.fmean(values) if values else None,
                        "std": statistics.stdev(values) if len(values) > 1 else None,
                        "paper_mean": _float(reference.get("mean")),
                        "paper_std": _float(reference.get("std")),
                    }
                )
    return rows


def paired_ttests(
    records: Iterable[Mapping[str, Any]],
    folds: Sequence[int],
    seeds: Sequence[int],
    selection: str = "last",
    aggregation: str = "paper",
    metrics: Sequence[str] = TTEST_METRICS,
    experiments: Sequence[Experiment] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> list[dict[str, Any]]:
    """Paired t-tests of the `reference` experiment against each other row of the table (`table_methods` order)
    per site and metric (image level), paired by seed (`paper`) or by (fold, seed) (`runs`)."""
    chosen = select_records(records, folds, seeds)
    methods = table_methods(chosen.values(), experiments)
    rows = []
    for site in record_sites(chosen.values(), selection):
        for metric in metrics:
            reference_values = cell_values(chosen, reference, site, metric, folds, seeds, selection, aggregation)
            for method in methods:
                baseline = method.name
                if baseline == reference:
                    continue
                theirs = cell_values(chosen, baseline, site, metric, folds, seeds, selection, aggregation)
                pairs = [(reference_values[k], theirs[k]) for k in sorted(reference_values) if k in theirs]
                t = p = None
                diffs = [a - b for a, b in pairs]
                # differences that are constant up to rounding have no defined t statistic
                if len(pairs) > 1 and statistics.pstdev(diffs) > 1e-9 * max(1.0, abs(statistics.fmean(diffs))):
                    result = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
                    t, p = float(result.statistic), float(result.pvalue)
                rows.append(
                    {
                        "selection": selection,
                        "aggregation": aggregation,
                        "site": site,
                        "metric": metric,
                        "reference": reference,
                        "baseline": baseline,
                        "baseline_method": method.method,  # its label (not a CSV column)
                        "n_pairs": len(pairs),
                        "mean_diff": statistics.fmean(diffs) if diffs else None,
                        "t": t,
                        "p": p,
                    }
                )
    return rows


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(row: Mapping[str, Any], plus_minus: str = " ± ") -> str:
    undefined = f" [{row['undefined']} undefined]" if row["undefined"] else ""
    if row["n"] == 0:
        return ("undefined" if row["undefined"] else "missing") + f" (0/{row['expected']})" + undefined
    text = fmt(row["mean"]) + (plus_minus + fmt(row["std"]) if row["std"] is not None else "")
    return text + ("" if row["n"] == row["expected"] else f" ({row['n']}/{row['expected']})*") + undefined


def _paper_cell(row: Mapping[str, Any], plus_minus: str = " ± ") -> str:
    if row["paper_mean"] is None:
        return ""
    return fmt(row["paper_mean"]) + (plus_minus + fmt(row["paper_std"]) if row["paper_std"] is not None else "")


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV (floats to 6 significant digits), spreadsheet-safe (covidct/csvfiles.py)."""
    return csv_text(
        ({c: f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns} for row in rows), columns
    )


def _by_cell(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    return {(r["experiment"], r["site"], r["metric"]): r for r in rows}


def provenance_lines(provenance: Mapping[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in provenance.items()]


def fold_caveats(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """What the records' sites without patient ids mean for their folds (a patient's slices may straddle a split),
    once per site, from the site specs the runs recorded."""
    notes: dict[str, str] = {}
    for record in records:
        run = record["run"]
        for name, spec in (run.get("sites") or {}).items():
            if name not in notes and spec.get("patients", {}).get("kind") == "none":
                notes[name] = site_from_dict(spec, f"run.sites.{name}", name).note(run.get("group_by", "patient"))
    return [notes[name] for name in sorted(notes)]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line a row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def p_value(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def results_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> list[str]:
    """One table per site: every method's cells (with the paper's value beside, where it has one)."""
    if not rows:
        return []
    cells = _by_cell(rows)
    first = rows[0]
    with_paper = any(r["paper_mean"] is not None for r in rows)
    methods = _methods(rows)
    blocks = {r["experiment"]: r.get("block", BLOCKS[0]) for r in rows}
    out = [
        f"## {title}",
        "",
        f"Checkpoint selection: `{first['selection']}`. Aggregation `{first['aggregation']}`: "
        f"{AGGREGATION_TEXT[first['aggregation']]}; in %. Cells marked * have fewer than the expected "
        f"{first['expected']}; [k undefined]: k runs whose metric is undefined (e.g. a test part with one class), "
        f"left out of the cell. ECE: expected calibration error ({ECE_BINS} bins; lower is better).",
        "",
    ]
    extra = [method for experiment, (method, row) in methods.items() if row is None]
    if extra:
        out += [f"After Table I's rows: experiments without a Table I row ({', '.join(extra)}).", ""]
    for site in dict.fromkeys(r["site"] for r in rows):
        out += [f"### Site {site}", ""]
        header = ["method", "n"]
        for m in STATISTICS:
            header += [METRIC_LABELS.get(m, m)] + (["paper"] if with_paper and m in METRIC_NAMES else [])
        lines, block = [], BLOCKS[0]
        for experiment, (method, _) in methods.items():
            if blocks[experiment] != block:  # a block's first row: its title across the table
                block = blocks[experiment]
                lines.append([f"**{block.capitalize()}**", *[""] * (len(header) - 1)])
            head = cells[(experiment, site, next(iter(STATISTICS)))]
            values = [method, f"{head['n']}/{head['expected']}"]
            for m in STATISTICS:
                values += [_cell(cells[(experiment, site, m)])]
                if with_paper and m in METRIC_NAMES:
                    values += [_paper_cell(cells[(experiment, site, m)])]
            lines.append(values)
        out += [*markdown_table(header, lines), ""]
    return out


def _methods(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, int | None]]:
    """The table's experiments in its order: name -> (label, Table I row or None)."""
    return {r["experiment"]: (r["method"], r.get("row")) for r in rows}


def ttests_markdown(ttests: Sequence[Mapping[str, Any]], methods: Mapping[str, str]) -> list[str]:
    """The t-tests of one aggregation; `methods` labels the experiments (the reference by its label)."""
    if not ttests:
        return []
    first = ttests[0]
    pairs = "seed" if first["aggregation"] == "paper" else "fold and seed"
    reference = methods.get(first["reference"], first["reference"])
    header = ["site", "metric", "baseline", "pairs", "mean diff (reference - baseline, pp)", "t", "p"]
    rows = [
        [t["site"], t["metric"], t.get("baseline_method", t["baseline"]), t["n_pairs"], fmt(t["mean_diff"])]
        + [fmt(t["t"], 3), p_value(t["p"])]
        for t in ttests
    ]
    title = (
        f"## Paired t-tests, aggregation `{first['aggregation']}`: the reference, {reference}, vs each baseline "
        f"(pairs by {pairs})"
    )
    return [title, "", *markdown_table(header, rows), ""]


def to_latex(rows: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> str:
    """A booktabs table like the paper's (its five metrics): the measured mean ± std, the paper's mean in
    parentheses; a comment alone where no run tests a Table I site (e.g. only leave-one-site-out runs)."""
    if not rows:
        return f"% Table I reproduced; protocol={provenance.get('protocol')}: no Table I runs\n"
    cells = _by_cell(rows)
    sites = list(dict.fromkeys(row["site"] for row in rows))
    columns = [(site, metric) for site in sites for metric in METRIC_NAMES]
    first = rows[0]
    out = [
        f"% Table I reproduced; protocol={provenance.get('protocol')}, selection={first['selection']}, "
        f"aggregation={first['aggregation']}",
        "\\begin{tabular}{l" + "c" * len(columns) + "}",
        "\\toprule",
        " & " + " & ".join(f"\\multicolumn{{{len(METRIC_NAMES)}}}{{c}}{{Site {site}}}" for site in sites) + " \\\\",
        "Method & " + " & ".join(METRIC_LABELS[m] for _, m in columns) + " \\\\",
        "\\midrule",
    ]
    methods = _methods(rows)
    for k, (experiment, (method, row)) in enumerate(methods.items()):
        if row is None and k > 0 and list(methods.values())[k - 1][1] is not None:
            out.append("\\midrule")  # experiments without a Table I row follow the paper's rows
        values = []
        for site, metric in columns:
            row = cells[(experiment, site, metric)]
            measured = _cell(row, plus_minus="$\\pm$").replace("*", "$^*$")
            paper = f" ({fmt(row['paper_mean'])})" if row["paper_mean"] is not None else ""
            values.append(measured + paper)
        out.append(method.replace("&", "\\&") + " & " + " & ".join(values) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)
