"""`python -m covidct.run experiment=NAME [overrides] [-m]`: the command line over covidct.training.fit.

Hydra composes each job's config and makes its folder; this module adds what a command line owes its user
before that: one line, not a traceback, for a config Hydra cannot compose or a folder it cannot create, and an
exit status of its own for a stopped run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig

import covidct.resolvers  # noqa: F401  (registers the config's interpolations, which Hydra resolves first)
from covidct.cli import cli_errors
from covidct.config_checks import check_config
from covidct.errors import STOP_SIGNALS, ConfigError, RunInterrupted

CONF = Path(__file__).resolve().parents[1] / "conf"


def _not_litlogger_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def silence_known_noise() -> None:
    """Lightning's litlogger advert and torch's LeafSpec deprecation (raised inside Lightning) print in every job
    of a sweep and say nothing about the run; any other warning still shows."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_litlogger_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_litlogger_advert)


@cli_errors
def _train_here(cfg: DictConfig) -> int:
    """Train into Hydra's run folder; the exit status (Hydra ignores a task's return value)."""
    silence_known_noise()
    check_config(cfg)  # before Lightning is imported (5 s on a laptop): a wrong option is one line at once
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from covidct.training.fit import train

    previous = {number: signal.signal(number, _stop_outside_training) for number in (signal.SIGINT, signal.SIGHUP)}
    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RunInterrupted as err:  # a status of its own: a sweep must not count the run as finished
        print(f"error: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except SIGTERMException:  # outside training steps (Lightning's own, which exits with status 0)
        print(
            "error: stopped by SIGTERM: no record written, the last checkpoint is kept; rerun the same command to "
            "resume.",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


def _stop_outside_training(number: int, frame: Any) -> None:
    """Ctrl-C or SIGHUP while the data is scanned or cached, or while the trained model is tested
    (LastCheckpoint handles them during training)."""
    raise RunInterrupted(
        f"stopped by {STOP_SIGNALS[number]} outside training: no record written, any checkpoint is kept; rerun the "
        "same command to resume.",
        number,
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    status = _train_here(cfg)
    if status:
        raise SystemExit(status)


def writable_log_dir_problem(argv: list[str]) -> str | None:
    """Why the run folders cannot be created under paths.log_dir (or env COVIDCT_OUTPUTS), if they cannot.

    Hydra creates a run's folder before any of our code runs, and a failure there is a library traceback.
    """
    elsewhere = ("hydra.run.dir=", "hydra.sweep.dir=")
    if any(a.startswith(elsewhere) or (a.startswith("-") and a not in ("-m", "--multirun")) for a in argv):
        return None  # Hydra writes elsewhere, or only prints (--cfg, --help, ...)
    given = [a.split("=", 1)[1] for a in argv if a.startswith(("paths.log_dir=", "++paths.log_dir="))]
    log_dir = Path(given[-1] if given else os.environ.get("COVIDCT_OUTPUTS") or "outputs")
    if "${" in str(log_dir):
        return None  # an interpolation: Hydra resolves it
    existing = next((p for p in [log_dir, *log_dir.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"paths.log_dir {log_dir} lies under {existing}, which is a file: choose a folder (paths.log_dir=DIR)."
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"paths.log_dir {log_dir}: {existing} is not writable; choose a writable folder (paths.log_dir=DIR)."
    return None


def accept_appended_experiment(argv: list[str]) -> list[str]:
    """`+experiment=NAME`, the form earlier versions documented, means `experiment=NAME` (the defaults list
    holds `experiment: null`, which Hydra would otherwise refuse to append to)."""
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def compose_problem(argv: list[str]) -> str | None:
    """Why Hydra cannot compose the config `argv` asks for (a multirun's first job), if it cannot, in one line:
    Hydra's own report of an unknown key (`model.tua=0.1`), a missing choice or a bad override is several lines
    and a hint at HYDRA_FULL_ERROR, printed after the sweep has begun."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv) or any(
        a.startswith(("hydra.sweeper.", "hydra.mode=")) for a in argv
    ):
        return None  # another config folder, Hydra only prints (--cfg, --help, ...), or sweeps it: Hydra's own handling
    overrides = [a for a in argv if not a.startswith("-")]
    parser = OverridesParser.create()
    multirun = "-m" in argv or "--multirun" in argv
    for index, text in enumerate(overrides):
        try:
            override = parser.parse_override(text)
        except Exception as err:  # Hydra's parse error, which for a whole list would not name the override
            return f"cannot parse {text!r}: " + _one_line(err)
        if multirun and override.is_sweep_override():
            if override.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP):
                return None  # a glob or an interval: the sweeper (its launcher) expands it
            overrides[index] = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra's composition errors share no base class short of Exception
        return "cannot compose the config: " + _one_line(err)
    return None


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line message as one line: its lines joined, a list of options (tab-indented) by commas, the
    config search path and documentation links left out."""
    parts: list[str] = []
    for line in str(err).split("\nConfig search path:")[0].splitlines():
        if not line.strip() or line.startswith("See https://"):
            continue
        if line.startswith("\t") and parts:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        else:
            parts.append(line.strip().rstrip("."))
    cause = err.__cause__
    if cause is not None and str(cause).strip() not in ("", "None"):
        parts.insert(1, f"({str(cause).splitlines()[0].strip()})")
    return "; ".join(parts).replace("; (", " (")


@cli_errors
def _check_command_line(argv: list[str]) -> int:
    problem = writable_log_dir_problem(argv) or compose_problem(argv)
    if problem:
        raise ConfigError(problem)
    return 0


if __name__ == "__main__":
    sys.argv[1:] = accept_appended_experiment(sys.argv[1:])
    status = _check_command_line(sys.argv[1:])
    if status:
        raise SystemExit(status)
    main()
