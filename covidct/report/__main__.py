"""`python -m covidct.report --runs DIR --out DIR [--select last|best_val_auc]`: Table I and its statistics, and
the leave-one-site-out table (loso.md, loso.csv) where the runs hold such records."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from covidct.cli import cli_errors
from covidct.errors import ConfigError
from covidct.metrics import PATIENT_POOLINGS
from covidct.report.table1 import DEFAULT_REFERENCE, SELECTIONS
from covidct.report.write import write_report


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from err


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        action="append",
        default=[],
        help="folder holding run folders (searched recursively); repeat it to report several sweeps in one table",
    )
    parser.add_argument(
        "--runs-if-present",
        type=Path,
        action="append",
        default=[],
        metavar="RUNS",
        help="as --runs, but left out where the folder does not exist (make table1-collect's: one block not run yet)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="where the tables (.md, .csv, .tex) and figures (.png) go"
    )
    parser.add_argument("--protocol", default="paper", help="name recorded in the provenance block")
    parser.add_argument("--folds", default="0,1,2,3", help="folds of the sweep (comma-separated)")
    parser.add_argument("--seeds", default="643,644,645", help="seeds of the sweep (comma-separated)")
    parser.add_argument(
        "--select",
        choices=SELECTIONS,
        default="last",
        help="checkpoint of each run to report: the last epoch (the paper's protocol) or the best validation AUC",
    )
    parser.add_argument(
        "--patient-pooling",
        choices=PATIENT_POOLINGS,
        default="mean",
        help="how patient-level results pool a patient's slice probabilities (recomputed from predictions)",
    )
    parser.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help="the experiment the t-tests and DeLong's test compare every other row with (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-broken",
        action="store_true",
        help="leave out unreadable run records (named in the provenance; their cells count as missing)",
    )
    parser.add_argument(
        "--wandb",
        nargs="?",
        const="offline",
        choices=("offline", "online"),
        help="also log the table and ROC curves to W&B: offline (the default, for `wandb sync`) or online",
    )
    args = parser.parse_args(argv)
    for runs in args.runs:
        if not runs.is_dir():
            raise ConfigError(f"runs folder {runs} does not exist; run the sweep first (make table1).")
    folders = [*args.runs, *(runs for runs in args.runs_if_present if runs.is_dir())]
    if not folders:
        named = ", ".join(map(str, args.runs_if_present)) or "none given"
        raise ConfigError(f"no runs folder to report ({named}); run a sweep first (make table1 or make federated).")
    path = write_report(
        folders,
        args.out,
        args.protocol,
        _int_list(args.folds),
        _int_list(args.seeds),
        args.select,
        args.patient_pooling,
        args.wandb,
        args.skip_broken,
        args.reference,
    )
    print(f"wrote {path} and its companions in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
