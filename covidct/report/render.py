"""The whole report as a pure function: run records and their predictions in, tables and texts out.

`build_report` computes every table (both aggregations, image and patient level, t-tests, intervals,
DeLong, reliability bins, ROC curves); `render_files` turns it into the files `make table1` writes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from covidct.experiments import Experiment
from covidct.metrics import LEVELS, recomputed_test
from covidct.report.claims import CLAIM_COLUMNS, CLAIM_EXPERIMENTS, claim_rows, claims_markdown
from covidct.report.curves import roc_curve
from covidct.report.table1 import (
    AGGREGATIONS,
    DEFAULT_REFERENCE,
    TABLE_COLUMNS,
    TTEST_COLUMNS,
    collect_results,
    fmt,
    markdown_table,
    p_value,
    paired_ttests,
    provenance_lines,
    results_markdown,
    select_records,
    table_methods,
    to_csv,
    to_latex,
    ttests_markdown,
)
from covidct.report.uncertainty import (
    CONFIDENCE,
    DELONG_COLUMNS,
    INTERVAL_COLUMNS,
    N_RESAMPLES,
    confidence_intervals,
    delong_rows,
    reliability_bins,
)


def _run_key(row: Mapping[str, Any]) -> tuple[str, int, int]:
    return row["experiment"], int(row["fold"]), int(row["seed"])


def _protocol(record: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """A record's protocol as (name, note); None for records from before runs recorded it."""
    protocol = record["run"].get("protocol")
    return (protocol["name"], protocol.get("note")) if protocol else None


def repool_patients(
    records: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]], selection: str, pooling: str
) -> list[Mapping[str, Any]]:
    """The records with the selection's results recomputed from their predictions with patients pooled by
    `pooling` (runs record mean pooling, which the CLI's loader has recomputed already: switching to max needs
    no training)."""
    if pooling == "mean":
        return list(records)
    by_run: dict[tuple[str, int, int], list[Mapping[str, Any]]] = {}
    for row in predictions:
        if row["selection"] == selection:
            by_run.setdefault(_run_key(row), []).append(row)
    out = []
    for record in records:
        rows = by_run.get(_run_key(record["run"]))
        result = record.get("test", {}).get(selection)
        if rows is None or result is None:
            out.append(record)
            continue
        repooled = recomputed_test({selection: result}, rows, pooling)
        out.append({**record, "test": {**record["test"], **repooled}})
    return out


def build_report(
    records: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    paper: Sequence[Mapping[str, Any]],
    folds: Sequence[int],
    seeds: Sequence[int],
    selection: str,
    pooling: str = "mean",
    experiments: Sequence[Experiment] | None = None,
    reference: str = DEFAULT_REFERENCE,
) -> dict[str, Any]:
    """Every table of the report. `records` hold their predictions' metrics (the CLI's loader recomputes them,
    covidct/report/recompute.py); `predictions` are prediction rows with experiment, fold and seed added;
    `pooling` pools a patient's slice probabilities (mean or max) for the patient-level results;
    `experiments` is the registry for records without `config.table1` (default: the repo's); `reference` the
    experiment the t-tests and DeLong's test compare every other row with. `methods`
    maps every row's experiment to its label, in the table's order; `pooled`, `test_images` and `protocols`
    are what the figures' captions say the curves pool."""
    records = repool_patients(records, predictions, selection, pooling)
    chosen = select_records(records, folds, seeds)
    rows_of_table = table_methods(chosen.values(), experiments)
    methods = {e.name: e.method for e in rows_of_table}
    federated = [e.name for e in rows_of_table if e.block == "federated"]
    keys = {(r["run"]["experiment"], int(r["run"]["fold"]), int(r["run"]["seed"])) for r in chosen.values()}
    rows = [
        p
        for p in predictions
        if p["selection"] == selection and (p["experiment"], int(p["fold"]), int(p["seed"])) in keys
    ]
    patient_sites = sorted(
        {site for r in chosen.values() for site in r.get("test", {}).get(selection, {}).get("patients", {})}
    )
    with_predictions = {r["experiment"] for r in rows}
    with_runs = [e for e in methods if e in with_predictions]
    baselines = [e for e in methods if e != reference]
    # the federated rows are also compared with their centralised twin, SepNorm (FedBN is its federated form)
    twin = [(FEDERATED_TWIN, federated)] if federated and reference != FEDERATED_TWIN else []
    sites = {r["site"] for r in rows}
    by_method_site = {
        (e, site): [r for r in rows if r["experiment"] == e and r["site"] == site]
        for e in with_runs
        for site in sorted(sites)
    }
    return {
        "selection": selection,
        "tables": {
            (aggregation, level): collect_results(
                records, paper, folds, seeds, selection, aggregation, level, experiments=experiments
            )
            for aggregation in AGGREGATIONS
            for level in LEVELS
        },
        "ttests": {
            a: paired_ttests(records, folds, seeds, selection, a, experiments=experiments, reference=reference)
            for a in AGGREGATIONS
        },
        "methods": methods,
        "intervals": [
            {"selection": selection, **row} for row in confidence_intervals(rows, with_runs, patient_sites, pooling)
        ],
        "delong": [
            {"selection": selection, **row}
            for against, compared in [(reference, baselines), *twin]
            for row in delong_rows(rows, against, compared, seeds, patient_sites, pooling)
            if against in with_runs
        ],
        "claims": claim_rows(rows, seeds, patient_sites, pooling) if set(CLAIM_EXPERIMENTS) <= set(methods) else [],
        "rocs": {
            key: roc_curve([r["label"] for r in items], [r["prob_covid"] for r in items])
            for key, items in by_method_site.items()
            if items
        },
        "reliability": {
            key: reliability_bins([r["label"] for r in items], [r["prob_covid"] for r in items])
            for key, items in by_method_site.items()
            if items
        },
        "pooled": {
            key: {
                "runs": len({(r["fold"], r["seed"]) for r in items}),
                "folds": sorted({int(r["fold"]) for r in items}),
                "seeds": sorted({int(r["seed"]) for r in items}),
                "predictions": len(items),
            }
            for key, items in by_method_site.items()
            if items
        },
        "test_images": {site: len({r["file"] for r in rows if r["site"] == site}) for site in sorted(sites)},
        "protocols": sorted({_protocol(r) for r in chosen.values()}, key=str),
        "patient_pooling": pooling,
        "missing_selection": sum(selection not in r.get("test", {}) for r in chosen.values()),
        "runs": len(chosen),
    }


FEDERATED_TWIN = "sepnorm"
_size = itemgetter("runs", "predictions")  # what a caption says each curve pools


def _runs(pooled: Mapping[str, Any], detail: bool = False) -> str:
    runs = _counted(pooled["runs"], "run")
    if detail:
        runs += f" ({_listed(pooled['folds'], 'fold')}; {_listed(pooled['seeds'], 'seed')})"
    return f"{runs}, {_counted(pooled['predictions'], 'prediction')}"


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _listed(values: Sequence[int], noun: str) -> str:
    return f"{noun}{'s' * (len(values) != 1)} {', '.join(map(str, values))}"


def curve_caption(report: Mapping[str, Any], site: str, default_protocol: tuple[str, str | None]) -> str:
    """A site figure's caption: the runs' protocol (`default_protocol` for records that predate recording
    it), the site's test images and the runs each curve pools, naming the methods that pool other counts."""
    protocols = list(dict.fromkeys(p or default_protocol for p in report["protocols"])) or [default_protocol]
    said = "; ".join(name + (f" ({note})" if note else "") for name, note in protocols)
    lines = [f"Protocol{'s' * (len(protocols) > 1)}: {said}."]
    pooled = {e: p for (e, s), p in report["pooled"].items() if s == site}
    if not pooled:
        return "\n".join([*lines, f"No test predictions of site {site}."])
    usual = Counter(map(_size, pooled.values())).most_common(1)[0][0]
    typical = next(p for p in pooled.values() if _size(p) == usual)
    others = [f"{report['methods'].get(e, e)}: {_runs(p)}" for e, p in pooled.items() if _size(p) != usual]
    lines.append(
        f"n = {report['test_images'][site]} test images of site {site}, checkpoint selection {report['selection']}. "
        f"Each curve pools one method's runs: {_runs(typical, detail=True)}"
        + (f"; except {'; '.join(others)}." if others else ".")
    )
    return "\n".join(lines)


def intervals_markdown(intervals: Sequence[Mapping[str, Any]], methods: Mapping[str, str]) -> list[str]:
    if not intervals:
        return []
    out = [
        f"## {100 * CONFIDENCE:.0f}% confidence intervals (stratified percentile bootstrap, {N_RESAMPLES} resamples)",
        "",
        "On each method's test predictions pooled over its runs (so the estimate is the pooled metric, not the "
        "mean of the runs' metrics, and the interval reflects the test cases, not the spread between training "
        "runs). A resample draws whole units (a patient's slices together where the site has patient ids, else "
        "images), COVID and non-COVID units separately. In %.",
        "",
    ]
    header = ["method", "site", "level", "metric", "estimate", "95% CI", "unit", "units", "predictions"]
    rows = [
        [methods.get(r["experiment"], r["experiment"]), r["site"], r["level"], r["metric"], fmt(r["estimate"])]
        + ["n/a" if r["low"] is None else f"{fmt(r['low'])} – {fmt(r['high'])}"]
        + [r["unit"], r["n_units"], r["n_predictions"]]
        for r in intervals
    ]
    return [*out, *markdown_table(header, rows), ""]


def delong_markdown(delong: Sequence[Mapping[str, Any]], methods: Mapping[str, str]) -> list[str]:
    if not delong:
        return []
    references = [methods.get(r, r) for r in dict.fromkeys(row["reference"] for row in delong)]
    against = (
        f"the reference, {references[0]}"
        if len(references) == 1
        else f"each reference ({', '.join(references[:-1])}; the federated rows also {references[-1]})"
    )
    out = [
        f"## DeLong's test: AUC of {against}, vs each baseline on the same test cases (per seed, folds pooled)",
        "",
        "Image level treats a patient's slices as independent cases (optimistic p-values on site B); the "
        "patient level (one pooled prediction per patient) does not. p-values are not corrected for "
        "multiple comparisons.",
        "",
    ]
    named = len(references) > 1  # several references: each row says its own
    header = ["site", "level", *(["reference"] if named else []), "baseline", "seed", "cases"]
    header += ["AUC reference", "AUC baseline", "diff (pp)", "z", "p"]
    rows = [
        [r["site"], r["level"], *([methods.get(r["reference"], r["reference"])] if named else [])]
        + [methods.get(r["baseline"], r["baseline"]), r["seed"], r["n_cases"]]
        + [fmt(r["auc_reference"])]
        + [fmt(r["auc_baseline"]), fmt(r["diff"]), fmt(r["z"], 3), p_value(r["p"])]
        for r in delong
    ]
    return [*out, *markdown_table(header, rows), ""]


def to_markdown(report: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    selection = report["selection"]
    out = [
        "# Table I, reproduced",
        "",
        f"Checkpoint selection `{selection}` "
        + ("(the last epoch: this project's paper protocol)." if selection == "last" else "(best validation AUC).")
        + " Every section below states its aggregation and n.",
        "",
    ]
    if report["missing_selection"]:
        out += [
            f"**{report['missing_selection']} of {report['runs']} runs have no `{selection}` result** (no "
            "validation part): their cells count as missing. Runs with `+protocol=paper_val` (or "
            "`data.val_fraction` > 0) record it.",
            "",
        ]
    tables, ttests = report["tables"], report["ttests"]
    out += results_markdown(tables[("paper", "images")], "Image level, aggregation `paper` (as the paper)")
    out += ttests_markdown(ttests["paper"], report["methods"])
    out += results_markdown(tables[("runs", "images")], "Image level, aggregation `runs`")
    out += ttests_markdown(ttests["runs"], report["methods"])
    pooling = report["patient_pooling"]
    for aggregation in ("paper", "runs"):
        title = f"Patient level (slice probabilities pooled by {pooling}), aggregation `{aggregation}`"
        out += results_markdown(tables[(aggregation, "patients")], title)
    out += intervals_markdown(report["intervals"], report["methods"])
    out += delong_markdown(report["delong"], report["methods"])
    out += ["## Provenance", "", *provenance_lines(provenance), ""]
    return "\n".join(out)


def provenance_json(provenance: Mapping[str, Any]) -> str:
    return json.dumps(dict(provenance), indent=2) + "\n"


def render_files(report: Mapping[str, Any], provenance: Mapping[str, Any]) -> dict[str, str]:
    """The report's text files by name (the figures are drawn by the CLI from `rocs` and `reliability`)."""
    tables = [row for rows in report["tables"].values() for row in rows]
    ttests = [row for rows in report["ttests"].values() for row in rows]
    return {
        "table1.md": to_markdown(report, provenance),
        "table1.csv": to_csv(tables, TABLE_COLUMNS),
        "table1.tex": to_latex(report["tables"][("paper", "images")], provenance),
        "ttests.csv": to_csv(ttests, TTEST_COLUMNS),
        "intervals.csv": to_csv(report["intervals"], INTERVAL_COLUMNS),
        "delong.csv": to_csv(report["delong"], DELONG_COLUMNS),
        "provenance.json": provenance_json(provenance),
        **(
            {
                "claims.md": claims_markdown(report["claims"], report["methods"]),
                "claims.csv": to_csv(report["claims"], CLAIM_COLUMNS),
            }
            if report["claims"]
            else {}
        ),
    }
