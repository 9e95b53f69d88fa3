"""A run's folder: its name, its lock, and what it holds.

A run's folder is named by a hash of its *semantic* config (what changes its numbers), so the same command always
lands in the same folder: a complete record there is skipped, an incomplete run resumes from its last checkpoint,
and a changed config gets a new folder. Lightning has none of this; what it has (checkpoints, the loader's place)
is used as it is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from covidct.atomic import atomic_write_text
from covidct.errors import ConfigError, DataError
from covidct.records import METRICS_FILE, read_run_record

log = logging.getLogger("covidct.run_folder")
RUN_CONFIG_FILE = "run_config.json"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
LOCK_FILE = ".lock"
# set by launchers for every process of a run but its first (Lightning's DDP ranks, SLURM tasks)
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Keys that change where or how visibly a run executes, never its numbers.
NON_SEMANTIC_KEYS = (
    "hydra",
    "paths",
    "logger",
    "data.root",
    "data.allow_outside_root",
    "data.cache_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "keep_optimizer_state",
    "wait_for_run_folder",
    "patient_ids",  # how the record names patients, not what it measures
    "pseudonym_key",
    "callbacks.last_checkpoint",
    "callbacks.throughput",
    "callbacks.run_summary",
    "callbacks.lr_monitor",
    "callbacks.progress_bar",
    "federated.round_timeout_s",  # how long the server waits, not what the sites train
    "federated.runtime",  # which of Flower's runtimes carries the messages, not what they say
    "federated.superlink",
    "federated.root_certificates",
)


# options added after runs were recorded, left out of the run id at the value that changes nothing, so those
# runs keep their ids (and folders)
INERT_DEFAULTS: dict[str, Any] = {"data.test_sites": [], "data.site_specs": None}
# classes renamed after runs were recorded, hashed under the name those runs recorded, so they keep their ids
RECORDED_TARGETS = {"covidct.data.SiteDataModule": "covidct.data.TwoSiteDataModule"}


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without NON_SEMANTIC_KEYS (and INERT_DEFAULTS at their inert value): two runs with
    equal values give equal numbers."""
    top = [k for k in cfg if k not in NON_SEMANTIC_KEYS and not (k == "warm_start" and not cfg.warm_start)]
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, top), resolve=True)
    for dotted in NON_SEMANTIC_KEYS:
        parent, _, leaf = dotted.rpartition(".")
        node = resolved.get(parent) if parent else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    for dotted, inert in INERT_DEFAULTS.items():
        parent, _, leaf = dotted.rpartition(".")
        node = resolved.get(parent)
        if isinstance(node, dict) and leaf in node and node[leaf] == inert:
            node.pop(leaf)
    for node in resolved.values():
        if isinstance(node, dict) and node.get("_target_") in RECORDED_TARGETS:
            node["_target_"] = RECORDED_TARGETS[node["_target_"]]
    return resolved


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The semantic config as plain JSON data, as run_config.json holds it: what a checkpoint stores
    (RUN_SETTINGS_KEY) so that resume_from can tell whether it continues a run of this configuration."""
    return json.loads(json.dumps(semantic_config(cfg), sort_keys=True, default=str))


def run_id(*, _root_: DictConfig) -> str:
    """Short hash of the semantic config; used in hydra.run.dir and hydra.sweep.subdir."""
    text = json.dumps(semantic_config(_root_), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunState:
    """A run folder is complete (record present), resumable (a checkpoint), or fresh; `started` says whether
    a run of this config began there before (an interrupted one, if it left no record)."""

    record: dict[str, Any] | None
    checkpoint: Path | None
    started: bool = False


@contextmanager
def run_dir_lock(output_dir: Path, wait: bool = False) -> Iterator[None]:
    """An exclusive lock on a run folder for as long as its run lives, so two identical runs never write one
    checkpoint at once: the second refuses in one line naming the holder (or, with `wait`, waits for it to end,
    then skips or resumes as usual). Taken by a run's first process only (its DDP ranks share the folder) with
    filelock's flock, released by the system however the process ends (on a file system without flock, such as
    some network mounts, the run warns and goes on unlocked)."""
    if any(os.environ.get(name, "0") != "0" for name in _RANK_VARIABLES):
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    lock = FileLock(path, timeout=0, fallback_to_soft=False)  # a soft marker would outlive a killed run
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(lock, wait)
    except OSError as err:  # e.g. a read-only folder of finished runs: nothing will be written there
        log.warning("cannot lock %s (%s): running without a lock", output_dir, err.strerror or err)
        yield
        return
    try:
        since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        path.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        yield
    finally:
        lock.release()


def _acquire(lock: FileLock, wait: bool) -> None:
    try:
        lock.acquire()
    except Timeout:
        folder = Path(lock.lock_file).parent
        try:
            holder = Path(lock.lock_file).read_text().strip() or "another process"
        except OSError:  # held all the same: never taken for a folder without a lock
            holder = "another process"
        if not wait:
            raise ConfigError(
                f"{folder} is in use by another run ({holder}); wait for it to finish or stop it, then rerun (or "
                "add wait_for_run_folder=true)."
            ) from None
        log.info("%s is in use by another run (%s): waiting for it", folder, holder)
        lock.acquire(timeout=-1)


def fingerprint_change(saved: Any, current: dict[str, dict[str, str]]) -> str | None:
    """Which sites and parts differ between two data fingerprints ('' parts: all), or None if they match."""
    if saved == current:
        return None
    if saved == "unreadable":
        return f"its {DATA_FINGERPRINT_FILE} cannot be read"
    if not isinstance(saved, dict):
        return "no data fingerprint is recorded (an older covidct wrote it: rerun it in a new folder)"
    changed = [
        f"site {site} {part}"
        for site in sorted(set(saved) | set(current))
        for part in sorted(set(saved.get(site, {})) | set(current.get(site, {})))
        if saved.get(site, {}).get(part) != current.get(site, {}).get(part)
    ]
    return "the images differ in " + ", ".join(changed)


def prepare_run_dir(cfg: DictConfig, output_dir: Path, fingerprint: dict[str, dict[str, str]] | None) -> RunState:
    """Claim `output_dir` for this config and data, or refuse if it holds a different run or was trained on
    other images (`fingerprint`, per site and part; None where the data are not on this machine, a deployed
    federation's, whose sites check their own); never touch a finished one."""
    output_dir = Path(output_dir)
    mine = semantic_config(cfg)
    marker = output_dir / RUN_CONFIG_FILE
    started = marker.is_file()
    if started:
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, ValueError) as err:
            raise DataError(
                f"{marker} cannot be read ({err}); delete that run folder to run this configuration again."
            ) from None
        if theirs != mine:
            changed = sorted(differing_keys(theirs, mine))
            raise ConfigError(
                f"{output_dir} holds a run of another configuration (differs in: {', '.join(changed[:8])}). "
                "Its results are left untouched; choose another paths.log_dir or name, or delete that folder."
            )
    prints = output_dir / DATA_FINGERPRINT_FILE
    if (output_dir / METRICS_FILE).is_file():
        record = read_run_record(output_dir)
        change = fingerprint and fingerprint_change(record.get("run", {}).get("data_fingerprint"), fingerprint)
        if change:
            raise DataError(
                f"{output_dir} holds a finished run on other data ({change}); its results are left untouched. "
                "Point data.root at the data it was trained on, or choose another paths.log_dir."
            )
        return RunState(record=record, checkpoint=None, started=True)
    last = output_dir / LAST_CHECKPOINT
    if fingerprint is not None and marker.is_file() and (prints.is_file() or last.is_file()):
        try:
            saved = json.loads(prints.read_text()) if prints.is_file() else None
        except (OSError, ValueError):
            saved = "unreadable"
        change = fingerprint_change(saved, fingerprint)
        if change:
            raise DataError(
                f"{output_dir} holds an interrupted run trained on other data ({change}): resuming would mix "
                "folds. Restore that data, or delete the folder to start again."
            )
    if not marker.is_file():
        atomic_write_text(marker, json.dumps(mine, indent=2, sort_keys=True, default=str) + "\n")
    if fingerprint is not None and not prints.is_file():
        atomic_write_text(prints, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return RunState(record=None, checkpoint=last if last.is_file() else None, started=started)


def differing_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Every dotted key at which two plain configs differ (a folder's recorded options against this run's; a value
    against its environment-free reading)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys: set[str] = set()
        for k in set(a) | set(b):
            keys |= differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return keys
    return set() if a == b else {prefix.rstrip(".")}
