"""What makes runs resumable and sweeps idempotent.

A run's folder is named by a hash of its *semantic* config (what changes its numbers), so the same
command always lands in the same folder: a complete record there is skipped, an incomplete run resumes
from its last checkpoint, and a changed config gets a new folder. Checkpoints are written atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from covidct.atomic import atomic_write, atomic_write_text
from covidct.errors import ConfigError, DataError, RunInterrupted
from covidct.records import METRICS_FILE, read_run_record

log = logging.getLogger("covidct.resume")
RUN_IDENTITY_KEY = "covidct_run"  # a checkpoint's fold, split seed, grouping and data fingerprint
RUN_SETTINGS_KEY = "covidct_settings"  # a checkpoint's run's semantic config (run_settings): what resume_from checks
# what a run that resumes another's checkpoint sets differently from it, by its nature
RESUME_KEYS = ("resume_from", "warm_start")
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
    checkpoint at once: the second refuses in one line naming the holder (or, with `wait`, waits for it to
    end, then skips or resumes as usual). Taken by a run's first process
    only (its DDP ranks share the folder); released by the system however the process ends. It relies on
    flock, which some network file systems do not honour across machines."""
    if any(os.environ.get(name, "0") != "0" for name in _RANK_VARIABLES):
        yield
        return
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = (output_dir / LOCK_FILE).open("a+")
    except OSError as err:  # e.g. a read-only folder of finished runs: nothing will be written there
        log.warning("cannot lock %s (%s): running without a lock", output_dir, err.strerror or err)
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if wait:
                log.info("%s is in use by another run (%s): waiting for it", output_dir, holder)
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                raise ConfigError(
                    f"{output_dir} is in use by another run ({holder}); wait for it to finish or stop it, then "
                    "rerun (or add wait_for_run_folder=true)."
                ) from None
        except OSError as err:  # a file system without flock (some Lustre or NFS mounts)
            log.warning("cannot lock %s (%s): running without a lock", output_dir, err.strerror or err)
        handle.seek(0)
        handle.truncate()
        since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        handle.flush()
        yield
    finally:
        handle.close()


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


def prepare_run_dir(cfg: DictConfig, output_dir: Path, fingerprint: dict[str, dict[str, str]]) -> RunState:
    """Claim `output_dir` for this config and data, or refuse if it holds a different run or was trained on
    other images (`fingerprint`, per site and part); never touch a finished one."""
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
            changed = sorted(_differing_keys(theirs, mine))
            raise ConfigError(
                f"{output_dir} holds a run of another configuration (differs in: {', '.join(changed[:8])}). "
                "Its results are left untouched; choose another paths.log_dir or name, or delete that folder."
            )
    prints = output_dir / DATA_FINGERPRINT_FILE
    if (output_dir / METRICS_FILE).is_file():
        record = read_run_record(output_dir)
        change = fingerprint_change(record.get("run", {}).get("data_fingerprint"), fingerprint)
        if change:
            raise DataError(
                f"{output_dir} holds a finished run on other data ({change}); its results are left untouched. "
                "Point data.root at the data it was trained on, or choose another paths.log_dir."
            )
        return RunState(record=record, checkpoint=None, started=True)
    last = output_dir / LAST_CHECKPOINT
    if marker.is_file() and (prints.is_file() or last.is_file()):
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
    if not prints.is_file():
        atomic_write_text(prints, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return RunState(record=None, checkpoint=last if last.is_file() else None, started=started)


def _differing_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: set[str] = set()
        for k in set(a) | set(b):
            keys |= _differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return keys
    return set() if a == b else {prefix.rstrip(".")}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents (memory-mapped, so cheap even for large files), or a clear error. Checkpoints may
    come from another institution: torch's weights-only unpickler reads tensors and plain data and refuses any other
    object, so loading one never runs its code (a covidct checkpoint needs no other global)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file, UnpicklingError for a refused object
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise DataError(
                f"checkpoint {path} is refused: loading it would run code it carries ({_unsafe_globals(path)}); "
                "covidct reads only tensors and plain data from a checkpoint. Use one that covidct wrote."
            ) from None
        raise DataError(f"checkpoint {path} cannot be read ({err}); delete or replace it.") from err


def _unsafe_globals(path: Path) -> str:
    """What a refused checkpoint would import and call (e.g. posix.system), as torch lists it without loading."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: torch cannot list them without unpickling
        return "objects other than tensors and plain data"
    return ", ".join(names) or "objects other than tensors and plain data"


def check_checkpoint(
    path: Path,
    model: pl.LightningModule,
    run: dict[str, Any],
    warm_start: bool = False,
    settings: dict[str, Any] | None = None,
) -> dict:
    """Refuse, with a clear message, a checkpoint of another method or backbone; unless `warm_start`, also one
    of another fold, split seed or data (train/test leakage), one of a run with other `settings` (given for
    resume_from: check_settings), or one that cannot resume (weights only).
    Returns the checkpoint's run identity (fold, split seed, data fingerprint)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a folder; give the path of a .ckpt file.")
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("covidct")
    expected = model.checkpoint_identity()
    if saved != expected:
        raise ConfigError(
            f"checkpoint {path} was saved by {saved or 'something other than covidct'}, but this run is "
            f"{expected}; resume only from a checkpoint of the same method and backbone."
        )
    theirs = checkpoint.get(RUN_IDENTITY_KEY, {})
    if warm_start:
        return theirs
    differs = [key for key in ("fold", "split_seed", "group_by") if theirs.get(key) != run[key]]
    change = fingerprint_change(theirs.get("data_fingerprint"), run["data_fingerprint"])
    if differs or change:
        what = ", ".join(
            [f"{k} {theirs.get(k)!r} (this run: {run[k]!r})" for k in differs] + ([change] if change else [])
        )
        raise ConfigError(
            f"checkpoint {path} was trained on other folds or data ({what}): resuming would leak test images "
            "into training. To start from its weights on purpose, add warm_start=true (recorded in the run record)."
        )
    if settings is not None:
        check_settings(path, checkpoint.get(RUN_SETTINGS_KEY), settings)
    if "optimizer_states" not in checkpoint:
        raise ConfigError(
            f"checkpoint {path} holds weights only (a finished run's) and cannot resume training; to start "
            "from its weights, add warm_start=true."
        )
    return theirs


def check_settings(path: Path, theirs: Any, mine: dict[str, Any]) -> None:
    """resume_from continues the checkpoint's run, so it must be a run of this configuration: every key of the
    run id (seed, learning rate, schedule, epochs, data settings, ...) but RESUME_KEYS. Any other is refused
    rather than adopted: Lightning would restore the checkpoint's optimizer and schedule (a cosine schedule of
    fewer epochs resumes at learning rate 0 and trains nothing) under a record and folder stating this run's
    settings, and adopting the checkpoint's instead would file a run under a config no one asked for. To rerun
    its run, give its values; to train with these settings from its weights, warm_start=true."""
    if not isinstance(theirs, dict):
        raise ConfigError(
            f"checkpoint {path} does not record the settings it was trained with (an older covidct wrote it), so "
            "resuming it cannot be checked against this run's; add warm_start=true to train from its weights."
        )
    differs = sorted(key for key in _differing_keys(theirs, mine) if key.split(".")[0] not in RESUME_KEYS)
    if differs:
        what = ", ".join(f"{key} {_at(theirs, key)} (this run: {_at(mine, key)})" for key in differs[:8])
        more = f" and {len(differs) - 8} more" if len(differs) > 8 else ""
        raise ConfigError(
            f"checkpoint {path} was trained with other settings ({what}{more}): resume_from continues its run, so "
            "they must be this run's. Rerun with its values, or add warm_start=true to train from its weights with "
            "these settings."
        )


def _at(config: dict[str, Any], dotted: str) -> str:
    """The value at a dotted key of a nested dict, as the message shows it ('unset' where there is none)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "unset"
        node = node[part]
    return json.dumps(node)


def resume_point(checkpoint: dict[str, Any], max_epochs: int) -> str:
    """Where a checkpoint resumes, in words: the epoch and batch it runs next (1-based), and its step."""
    step = checkpoint.get("global_step", 0)
    state = next((v for v in checkpoint.values() if isinstance(v, dict) and "next_batch" in v), None)
    if state is None:  # an epoch-end checkpoint of an earlier version
        return f"the start of epoch {int(checkpoint.get('epoch', 0)) + 2}/{max_epochs} (step {step})"
    at = state["next_batch"]
    if at["epoch"] >= max_epochs:
        return f"the end of training (step {step}): testing only"
    if at["batch"] == 0:
        return f"the start of epoch {at['epoch'] + 1}/{max_epochs} (step {step})"
    return f"epoch {at['epoch'] + 1}/{max_epochs}, batch {at['batch'] + 1} (step {step})"


def _size_of_last(filepath: str) -> str:
    """The size of the checkpoint being replaced, as a guide to the space a new one needs."""
    path = Path(filepath)
    return (
        f"{path.stat().st_size / 2**20:.0f} MiB" if path.is_file() else "as much as the model's weights and Adam state"
    )


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes to a temp file and renames it, so a kill mid-write never corrupts
    the checkpoint a rerun resumes from."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not trainer.is_global_zero:  # writes nothing on the other ranks, but they must join its barrier
            super()._save_checkpoint(trainer, filepath)
            return

        def save(temp: Path) -> None:
            super(AtomicCheckpoint, self)._save_checkpoint(trainer, str(temp))

        try:
            atomic_write(Path(filepath), save)
        except OSError as err:  # e.g. a full disk
            raise DataError(
                f"cannot write checkpoint {filepath} ({err.strerror or err}); a checkpoint of this run takes about "
                f"{_size_of_last(filepath)}: free that much space and rerun to resume."
            ) from None
        self._last_checkpoint_saved = filepath


# SIGHUP: the terminal or SSH session closed; treated as SIGTERM, so a run started without nohup keeps its epoch
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
RANKS_AGREE_EVERY = 10  # steps between the ranks' agreement on a stop or a timed checkpoint (a device sync each)


class LastCheckpoint(AtomicCheckpoint):
    """The checkpoint a rerun resumes from, so that a stopped run loses at most `every_minutes` of training:
    written at every epoch's end, after the first step that ends `every_minutes` or more after the last one
    was written, and, on SIGINT (Ctrl-C), SIGTERM or SIGHUP, after the step in progress, before the run stops with
    RunInterrupted. A second Ctrl-C stops at once. Mid-epoch checkpoints hold the sampler's next batch
    (SiteDataModule.state_dict), so the resumed run sees exactly the batches an uninterrupted one would.
    The last step of an epoch is never saved on its own: the epoch's own checkpoint follows it, after the
    epoch-end work (schedule step, validation) that a resume from that step would skip; nor is a step in the
    middle of a gradient accumulation. Under DDP the ranks agree every RANKS_AGREE_EVERY steps."""

    def __init__(self, every_minutes: float | None = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every_minutes = every_minutes
        self._saved_at = time.monotonic()
        self._stop: int | None = None
        self._handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = time.monotonic()
        self._stop = signal.SIGTERM if trainer.received_sigterm else None  # one that came while setting up
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._handlers = {number: signal.signal(number, self._request_stop) for number in STOP_SIGNALS}

    def _request_stop(self, number: int, frame: Any) -> None:
        if self._stop is not None and number == signal.SIGINT:
            self._restore_handlers()
            raise RunInterrupted(
                "stopped by a second Ctrl-C (SIGINT) in the middle of a step: the steps since the last checkpoint "
                "are lost; rerun the same command to resume from it.",
                number,
            )
        self._stop = number
        message = f"\n{STOP_SIGNALS[number]}: stopping once the step in progress is done and saved"
        message += " (Ctrl-C again stops at once, losing the steps since the last checkpoint)\n"
        os.write(2, message.encode())  # print and logging are not safe inside a signal handler

    def _restore_handlers(self) -> None:
        for number, handler in self._handlers.items():
            signal.signal(number, handler)
        self._handlers = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_handlers()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False):
            self._stopped(trainer, f"at the start of epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False):  # at the last step
            self._stopped(trainer, f"at the end of training (epoch {trainer.max_epochs}/{trainer.max_epochs})")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        done = batch_idx + 1
        if done >= trainer.num_training_batches or done % trainer.accumulate_grad_batches:
            return
        if trainer.world_size > 1 and trainer.global_step % RANKS_AGREE_EVERY:
            return
        due = self.every_minutes is not None and time.monotonic() - self._saved_at >= 60 * self.every_minutes
        stop = trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False)
        if not (stop or trainer.strategy.reduce_boolean_decision(due, all=False)):
            return
        where = f"after batch {done}/{trainer.num_training_batches} of epoch {trainer.current_epoch + 1}/"
        where += f"{trainer.max_epochs}"
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            log.info("checkpoint %s (step %d)", where, trainer.global_step)
        if stop:
            self._stopped(trainer, where)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()

    def _stopped(self, trainer: pl.Trainer, where: str) -> None:
        number = self._stop if self._stop is not None else signal.SIGINT  # another rank's signal
        if self.best_model_path:
            kept = f"the checkpoint {self.best_model_path} holds the run so far: rerun the same command to resume"
        elif trainer.global_step == 0:
            kept = "nothing was trained yet: rerun the same command to start"
        else:
            kept = "this run's folder holds no checkpoint yet: rerun the same command to start again"
        raise RunInterrupted(f"stopped by {STOP_SIGNALS[number]} {where}; {kept}.", number)
