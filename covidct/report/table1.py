"""Table I from run records: pure functions from records to tables, t-tests and their renderings.

Like DomainBed's collect_results: nothing here reads files or trains; the CLI (`python -m covidct.report`)
feeds it run records and writes what it returns.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scipy import stats

from covidct.data.folds import SITE_A_FOLD_NOTE
from covidct.data.sources import SITES
from covidct.records import METRIC_NAMES

# Table I's rows in the paper's order: experiment name -> the paper's method label.
TABLE1_ROWS: dict[str, str] = {
    "single_covidnet": "Single (COVID-Net)",
    "single": "Single (Redesign)",
    "joint_covidnet": "Joint (COVID-Net)",
    "joint": "Joint (Redesign)",
    "series_adapter": "Series Adapter",
    "parallel_adapter": "Parallel Adapter",
    "msnet": "MS-Net",
    "sepnorm": "SepNorm",
    "ours": "SepNorm + Contrastive (ours)",
}
REFERENCE = "ours"
METRIC_LABELS = {"acc": "Acc", "f1": "F1", "recall": "Recall", "precision": "Precision", "auc": "AUC"}
TTEST_METRICS = ("auc", "acc")
TABLE_COLUMNS = ("experiment", "method", "site", "metric", "n", "expected", "mean", "std", "paper_mean", "paper_std")
TTEST_COLUMNS = ("site", "metric", "baseline", "n_pairs", "mean_diff", "t", "p")


class DuplicateRunError(ValueError):
    """Two records claim the same (experiment, fold, seed): the table would silently pick one."""


def _key(record: Mapping[str, Any]) -> tuple[str, int, int]:
    run = record["run"]
    return run["experiment"], int(run["fold"]), int(run["seed"])


def select_records(
    records: Iterable[Mapping[str, Any]], folds: Sequence[int], seeds: Sequence[int]
) -> dict[tuple[str, int, int], Mapping[str, Any]]:
    """The records of the Table I sweep, one per (experiment, fold, seed); others are ignored."""
    wanted = {(e, f, s) for e in TABLE1_ROWS for f in folds for s in seeds}
    chosen: dict[tuple[str, int, int], Mapping[str, Any]] = {}
    for record in records:
        key = _key(record)
        if key not in wanted:
            continue
        if key in chosen:
            raise DuplicateRunError(
                f"two run records for experiment={key[0]} fold={key[1]} seed={key[2]}; keep one per "
                "configuration in the runs folder (or give each sweep its own OUT)."
            )
        chosen[key] = record
    return chosen


def collect_results(
    records: Iterable[Mapping[str, Any]],
    paper: Iterable[Mapping[str, Any]],
    folds: Sequence[int],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """One row per (experiment, site, metric): mean and sample std over folds x seeds, in %, with n.

    Rows with no runs stay in the table with n = 0 and empty statistics, so a gap is visible.
    """
    chosen = select_records(records, folds, seeds)
    paper_values = {(p["experiment"], p["site"], p["metric"]): p for p in paper}
    expected = len(folds) * len(seeds)
    rows = []
    for experiment, method in TABLE1_ROWS.items():
        for site in SITES:
            for metric in METRIC_NAMES:
                values = [
                    100.0 * r[site][metric]
                    for (e, _, _), r in sorted(chosen.items())
                    if e == experiment and site in r and not math.isnan(r[site][metric])
                ]
                reference = paper_values.get((experiment, site, metric), {})
                rows.append(
                    {
                        "experiment": experiment,
                        "method": method,
                        "site": site,
                        "metric": metric,
                        "n": len(values),
                        "expected": expected,
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
    metrics: Sequence[str] = TTEST_METRICS,
) -> list[dict[str, Any]]:
    """Paired t-tests of `ours` against each baseline per site and metric, runs paired by (fold, seed)."""
    chosen = select_records(records, folds, seeds)
    rows = []
    for site in SITES:
        for metric in metrics:
            for baseline in TABLE1_ROWS:
                if baseline == REFERENCE:
                    continue
                pairs = [
                    (100.0 * chosen[(REFERENCE, f, s)][site][metric], 100.0 * chosen[(baseline, f, s)][site][metric])
                    for f in folds
                    for s in seeds
                    if (REFERENCE, f, s) in chosen
                    and (baseline, f, s) in chosen
                    and site in chosen[(REFERENCE, f, s)]
                    and site in chosen[(baseline, f, s)]
                ]
                t = p = None
                diffs = [a - b for a, b in pairs]
                # differences that are constant up to rounding have no defined t statistic
                if len(pairs) > 1 and statistics.pstdev(diffs) > 1e-9 * max(1.0, abs(statistics.fmean(diffs))):
                    result = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
                    t, p = float(result.statistic), float(result.pvalue)
                rows.append(
                    {
                        "site": site,
                        "metric": metric,
                        "baseline": baseline,
                        "n_pairs": len(pairs),
                        "mean_diff": statistics.fmean(diffs) if diffs else None,
                        "t": t,
                        "p": p,
                    }
                )
    return rows


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(row: Mapping[str, Any], plus_minus: str = " ± ") -> str:
    if row["n"] == 0:
        return f"missing (0/{row['expected']})"
    text = _fmt(row["mean"]) + (plus_minus + _fmt(row["std"]) if row["std"] is not None else "")
    return text + ("" if row["n"] == row["expected"] else f" ({row['n']}/{row['expected']})*")


def _paper_cell(row: Mapping[str, Any], plus_minus: str = " ± ") -> str:
    if row["paper_mean"] is None:
        return ""
    return _fmt(row["paper_mean"]) + (plus_minus + _fmt(row["paper_std"]) if row["paper_std"] is not None else "")


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns})
    return buffer.getvalue()


def _by_cell(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    return {(r["experiment"], r["site"], r["metric"]): r for r in rows}


def provenance_lines(provenance: Mapping[str, Any]) -> list[str]:
    lines = [f"- {key}: {value}" for key, value in provenance.items()]
    return [*lines, f"- fold caveat: {SITE_A_FOLD_NOTE}"]


def to_markdown(
    rows: Sequence[Mapping[str, Any]], ttests: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]
) -> str:
    """Per site: ours (mean ± std over folds x seeds, n) beside the paper's value, in %; then the t-tests."""
    cells = _by_cell(rows)
    out = ["# Table I, reproduced", ""]
    out += [
        "Ours: mean ± sample std over folds x seeds, in %, each beside the paper's value. "
        "Cells marked * have fewer runs than expected.",
        "",
    ]
    for site in SITES:
        out += [f"## Site {site}", ""]
        header = ["method", "runs"]
        for m in METRIC_NAMES:
            header += [METRIC_LABELS[m], "paper"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for experiment, method in TABLE1_ROWS.items():
            first = cells[(experiment, site, METRIC_NAMES[0])]
            values = [method, f"{first['n']}/{first['expected']}"]
            for m in METRIC_NAMES:
                values += [_cell(cells[(experiment, site, m)]), _paper_cell(cells[(experiment, site, m)])]
            out.append("| " + " | ".join(values) + " |")
        out.append("")
    out += ["## Paired t-tests: ours vs each baseline (pairs by fold and seed)", ""]
    out += [
        "| site | metric | baseline | pairs | mean diff (ours - baseline, pp) | t | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in ttests:
        p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        out.append(
            f"| {t['site']} | {t['metric']} | {TABLE1_ROWS[t['baseline']]} | {t['n_pairs']} | "
            f"{_fmt(t['mean_diff'])} | {_fmt(t['t'], 3)} | {p} |"
        )
    out += ["", "## Provenance", "", *provenance_lines(provenance), ""]
    return "\n".join(out)


def to_latex(rows: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any]) -> str:
    """A booktabs table like the paper's: ours ± std, the paper's mean in parentheses."""
    cells = _by_cell(rows)
    columns = [(site, metric) for site in SITES for metric in METRIC_NAMES]
    out = [
        f"% Table I reproduced; protocol={provenance.get('protocol')}, commit={provenance.get('git_commit')}",
        "\\begin{tabular}{l" + "c" * len(columns) + "}",
        "\\toprule",
        " & " + " & ".join(f"\\multicolumn{{{len(METRIC_NAMES)}}}{{c}}{{Site {site}}}" for site in SITES) + " \\\\",
        "Method & " + " & ".join(METRIC_LABELS[m] for _, m in columns) + " \\\\",
        "\\midrule",
    ]
    for experiment, method in TABLE1_ROWS.items():
        values = []
        for site, metric in columns:
            row = cells[(experiment, site, metric)]
            ours = _cell(row, plus_minus="$\\pm$").replace("*", "$^*$")
            paper = f" ({_fmt(row['paper_mean'])})" if row["paper_mean"] is not None else ""
            values.append(ours + paper)
        out.append(method.replace("&", "\\&") + " & " + " & ".join(values) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)
