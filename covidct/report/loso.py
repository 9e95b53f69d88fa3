"""The leave-one-site-out table from run records: pure functions, as table1.py.

A LOSO record (data.test_sites) tests a site its method never trained on, once per norm choice its method
allows (covidct.evaluate.unseen_choices). Per (method, held-out site, choice, level, metric) the table gives the
mean and sample std over every fold x seed run, with n; a choice a method does not have is an empty cell.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from covidct.experiments import Experiment, sort_experiments
from covidct.records import held_out_sites
from covidct.report.table1 import DuplicateRunError, markdown_table, table_methods

LOSO_COLUMNS = ("selection", "experiment", "method", "held_out", "trained_on", "unseen_norm", "level", "metric")
LOSO_COLUMNS += ("n", "mean", "std")
LOSO_METRICS = ("auc", "acc")
CHOICE_ORDER = ("adabn", "mean", "shared")  # then site:<name> by name


def _choice_key(choice: str) -> tuple[int, str]:
    return (CHOICE_ORDER.index(choice), "") if choice in CHOICE_ORDER else (len(CHOICE_ORDER), choice)


def _trained_on(record: Mapping[str, Any]) -> str:
    held = set(held_out_sites(record))
    return ",".join(site for site in record["run"]["splits"]["sites"] if site not in held)


def loso_rows(
    records: Iterable[Mapping[str, Any]],
    folds: Sequence[int],
    seeds: Sequence[int],
    selection: str = "last",
    metrics: Sequence[str] = LOSO_METRICS,
    experiments: Sequence[Experiment] | None = None,
) -> list[dict[str, Any]]:
    """One row per (experiment, held-out site, norm choice, level, metric) of the LOSO records of the sweep's
    folds and seeds, in % (mean, sample std, n over runs); methods in Table I order."""
    wanted = {(f, s) for f in folds for s in seeds}
    chosen: dict[tuple[str, int, int, tuple[str, ...], str], Mapping[str, Any]] = {}
    for record in records:
        run = record["run"]
        held = tuple(held_out_sites(record))
        key = (run["experiment"], int(run["fold"]), int(run["seed"]), held, _trained_on(record) if held else "")
        if not held or key[1:3] not in wanted:
            continue
        if key in chosen:
            raise DuplicateRunError(
                f"two leave-one-site-out records for experiment={key[0]} fold={key[1]} seed={key[2]} held out "
                f"{','.join(held)} (trained on {key[4]}); keep one per configuration in the runs folder."
            )
        chosen[key] = record
    values: dict[tuple[str, str, str, str, str, str], list[float]] = {}
    for (experiment, *_), record in chosen.items():
        trained = _trained_on(record)
        for choice, results in record.get("test", {}).get(selection, {}).get("unseen", {}).items():
            for level in ("images", "patients"):
                for site, site_values in results.get(level, {}).items():
                    for metric in metrics:
                        value = site_values.get(metric)
                        if value is not None and not math.isnan(value):
                            key6 = (experiment, site, trained, choice, level, metric)
                            values.setdefault(key6, []).append(100.0 * value)
    methods = {e.name: e for e in table_methods(chosen.values(), experiments)}
    order = {name: k for k, name in enumerate(e.name for e in sort_experiments(methods.values()))}
    rows = []
    for experiment, site, trained, choice, level, metric in sorted(
        values, key=lambda k: (k[1], k[4] != "images", list(metrics).index(k[5]), order[k[0]], _choice_key(k[3]))
    ):
        found = values[(experiment, site, trained, choice, level, metric)]
        method = methods[experiment]  # every experiment of the records is one
        rows.append(
            {
                "selection": selection,
                "experiment": experiment,
                "method": method.method,
                "held_out": site,
                "trained_on": trained,
                "unseen_norm": choice,
                "level": level,
                "metric": metric,
                "n": len(found),
                "mean": statistics.fmean(found),
                "std": statistics.stdev(found) if len(found) > 1 else None,
            }
        )
    return rows


def _cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return ""
    std = f" ± {row['std']:.1f}" if row["std"] is not None else ""
    return f"{row['mean']:.1f}{std} (n={row['n']})"


def loso_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table per held-out site, level and metric: methods down, norm choices across."""
    if not rows:
        return "# Leave-one-site-out\n\nNo leave-one-site-out records (data.test_sites) among the runs.\n"
    out = [
        "# Leave-one-site-out",
        "",
        "Each method trained on every site but the held-out one, which is then tested whole, once per norm "
        "choice: adabn (BatchNorm statistics re-estimated on the held-out site's images, Li et al. 2016), mean "
        "(the training sites' norms averaged), site:X (site X's norms), shared (layers all sites share, used "
        "as they are). Mean ± sample std over every fold x seed run, in %; an empty cell is a choice the method "
        "does not have.",
        "",
    ]
    blocks: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        blocks.setdefault((row["held_out"], row["trained_on"], row["level"], row["metric"]), []).append(row)
    for (site, trained, level, metric), block in blocks.items():
        choices = sorted({r["unseen_norm"] for r in block}, key=_choice_key)
        cells = {(r["method"], r["unseen_norm"]): r for r in block}
        methods = list(dict.fromkeys(r["method"] for r in block))
        level_name = "image" if level == "images" else "patient"
        out += [f"## Site {site} held out (trained on {trained}): {metric.upper()}, {level_name} level", ""]
        out += markdown_table(
            ["method", *choices], ([m, *(_cell(cells.get((m, c))) for c in choices)] for m in methods)
        )
        out.append("")
    return "\n".join(out)
