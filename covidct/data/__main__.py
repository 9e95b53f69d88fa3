"""`python -m covidct.data`: fetch the data (`download`), say whether it is in place (`where`), check it (`check`).

Each subcommand is one `_<name>_command` function that registers its parser and handler; adding a
subcommand means writing one such function and listing it in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from covidct.cli import cli_errors
from covidct.data.check import check_data, format_report
from covidct.data.download import (
    DEFAULT_BASE_URL,
    download_site_a,
    download_site_b,
    missing_data_message,
)
from covidct.data.sites import PAPER_SITES
from covidct.data.sources import GROUPINGS


def _add_root(parser: argparse.ArgumentParser) -> None:
    default = Path(os.environ.get("COVIDCT_DATA") or "data")
    parser.add_argument(
        "--root",
        type=Path,
        default=default,
        help=f"data root (default: env COVIDCT_DATA or 'data'; now {default})",
    )


def _download_command(subparsers: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        manual: list[str] = []
        for site in dict.fromkeys(args.sites):
            if site == "B":
                download_site_b(args.root, base_url=args.base_url, force=args.force)
            else:
                message = download_site_a(args.root, force=args.force)
                if message:
                    manual.append(message)
        if manual:
            print("\nSITE A IS NOT DOWNLOADED YET: it still needs the manual step below.\n" + "\n".join(manual))
        else:
            print(f"data ready under {args.root}")
        return 0

    parser = subparsers.add_parser("download", help="fetch site B from GitHub and site A from Kaggle")
    _add_root(parser)
    parser.add_argument("--sites", nargs="+", choices=PAPER_SITES, default=list(PAPER_SITES), help="sites to fetch")
    parser.add_argument("--force", action="store_true", help="re-download folders that already hold images")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where site B's repository files live")
    parser.set_defaults(run=run)


def _where_command(subparsers: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        message = missing_data_message(args.root)
        print(message or f"data found under {args.root}")
        return 1 if message else 0

    parser = subparsers.add_parser("where", help="say whether the data root is complete (exit 1 if not)")
    _add_root(parser)
    parser.set_defaults(run=run)


def _check_command(subparsers: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        report = check_data(
            args.root,
            args.split_seed,
            args.group_by,
            args.batch_per_site,
            args.workers,
            args.sites,
            args.allow_outside_root,
        )
        print(format_report(report))
        if args.json:
            args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        return 0 if report.ok else 1

    parser = subparsers.add_parser(
        "check", help="decode every image, find duplicates and patient-id gaps (exit 1 if training would break)"
    )
    _add_root(parser)
    parser.add_argument("--split-seed", type=int, default=0, help="fold assignment to test duplicates against")
    parser.add_argument("--group-by", choices=GROUPINGS, default="patient", help="as data.group_by")
    parser.add_argument("--batch-per-site", type=int, default=16, help="as data.batch_per_site")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument(
        "--sites",
        nargs="+",
        default=list(PAPER_SITES),
        help="sites to check, as data.sites names them (conf/data/site/)",
    )
    parser.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="as data.allow_outside_root=true: site files may name folders outside --root (absolute, or ..)",
    )
    parser.set_defaults(run=run)


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _download_command,
    _where_command,
    _check_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m covidct.data", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command(subparsers)
    return parser


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
