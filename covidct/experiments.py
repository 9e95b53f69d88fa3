"""The experiment registry: every `conf/experiment/<name>.yaml` and its Table I row, in one place.

Each experiment file may declare its row of Table I:

    table1:
      row: 9                              # its position (1, 2, ...): rows are sorted by it
      label: SepNorm + Contrastive (ours) # the method's name in the tables
      paper: ours                         # its rows in experiments/paper_table1.csv (null: none)
      block: centralised                  # or federated: the table's second block (default: centralised)

An experiment without a `table1` block (or with `table1: null`) runs like any other and is reported after
Table I's rows, under its name. The Makefile's sweep (`make table1`), the report's fallback for run records
that predate `config.table1`, and the tests all read this registry; nothing else lists the methods.

`python -m covidct.experiments` prints the Table I experiments of the centralised block comma-separated, in row
order (what `make table1` sweeps); `--block federated` those of the federated block (`make federated`); `--all`
prints every experiment; `--config-dir DIR` adds the experiments of another
config folder (as `hydra.searchpath` does; the repo's `conf/` comes first and wins a name both define).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from covidct.cli import cli_errors
from covidct.errors import ConfigError
from covidct.schemas import checked, rule

CONF = Path(__file__).resolve().parents[1] / "conf"
BLOCKS = ("centralised", "federated")  # Table I's blocks, in the table's order


@dataclass(frozen=True)
class Experiment:
    """One experiment: its name (the file's stem, `experiment=NAME`) and its Table I row, label and paper key
    (all None for an experiment without a row)."""

    name: str
    row: int | None = None
    label: str | None = None
    paper: str | None = None
    block: str = "centralised"

    @property
    def in_table1(self) -> bool:
        return self.row is not None

    @property
    def method(self) -> str:
        """The name shown in the tables: the label, or the experiment's name where it has none."""
        return self.label if self.label is not None else self.name


@dataclass(frozen=True)
class Table1:
    """The schema of an experiment's `table1` block, checked strictly: its values are used as written."""

    row: int = rule("be a positive integer", lambda row: row >= 1)
    label: str = rule("be a non-empty string", str.strip)
    paper: str | None = rule("be a key of experiments/paper_table1.csv (or null)", str.strip, None)
    block: str = rule(f"be one of {', '.join(BLOCKS)}", lambda block: block in BLOCKS, BLOCKS[0])


def parse_table1(name: str, block: Any, where: str) -> Experiment:
    """An experiment from its `table1` block (None: no row); `where` names the block's source in errors."""
    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=False)
    return Experiment(name) if block is None else Experiment(name, **checked(Table1, block, where, "table1", True))


def read_experiment(path: Path) -> Experiment:
    """One experiment file's entry; ConfigError (naming the file) where its `table1` block is malformed."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml's and OmegaConf's errors alike
        raise ConfigError(f"{path}: not a readable experiment config ({err})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: an experiment config must be a mapping")
    name = cfg.get("name", path.stem)
    if name != path.stem:
        raise ConfigError(
            f"{path}: name is {name!r} but the file is {path.stem}.yaml; run records and experiment=NAME "
            "must agree, so make them the same"
        )
    return parse_table1(path.stem, cfg.get("table1"), str(path))


def load_experiments(config_dirs: Iterable[str | Path] = ()) -> list[Experiment]:
    """Every experiment of the repo's `conf/` and of `config_dirs` (folders holding an `experiment/` folder,
    optionally as `file://DIR`, like `hydra.searchpath` entries): the Table I ones sorted by row, then the
    others by name. A name found twice keeps its first definition (the repo's). Two experiments claiming one
    row are a ConfigError."""
    found: dict[str, tuple[Experiment, Path]] = {}
    for folder in (CONF, *(Path(str(d).removeprefix("file://")) for d in config_dirs)):
        for path in sorted((folder / "experiment").glob("*.yaml")):
            if path.stem not in found:
                found[path.stem] = (read_experiment(path), path)
    by_row: dict[int, Path] = {}
    for experiment, path in found.values():  # in search order: a later folder's file is the one named
        if experiment.row is None:
            continue
        if experiment.row in by_row:
            raise ConfigError(
                f"{path}: table1.row {experiment.row} is also the row of {by_row[experiment.row]}; "
                "give each experiment its own row"
            )
        by_row[experiment.row] = path
    return sort_experiments(e for e, _ in found.values())


def sort_experiments(experiments: Iterable[Experiment]) -> list[Experiment]:
    """Table I's experiments block by block, by row (then name), then those without a row by name."""
    return sorted(experiments, key=lambda e: (e.row is None, BLOCKS.index(e.block), e.row or 0, e.name))


@lru_cache(maxsize=1)
def registry() -> tuple[Experiment, ...]:
    """The repo's experiments (read once per process)."""
    return tuple(load_experiments())


def table1_experiments(experiments: Sequence[Experiment] | None = None, block: str | None = None) -> list[Experiment]:
    """The experiments with a Table I row (of `block`, or every block), in row order (default: the repo's)."""
    chosen = registry() if experiments is None else experiments
    return [e for e in chosen if e.in_table1 and block in (None, e.block)]


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every experiment, not only Table I's (those after)")
    parser.add_argument("--block", choices=BLOCKS, default=BLOCKS[0], help="the Table I block to print")
    parser.add_argument(
        "--config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="another config folder whose experiment/*.yaml count too (repeatable; as hydra.searchpath)",
    )
    args = parser.parse_args(argv)
    experiments = load_experiments(args.config_dir)
    chosen = experiments if args.all else table1_experiments(experiments, args.block)
    print(",".join(e.name for e in chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
