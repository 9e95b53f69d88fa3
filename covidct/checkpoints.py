"""Checkpoints read and checked: a checkpoint may come from another institution, or from another run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from covidct.errors import ConfigError, DataError
from covidct.run_folder import differing_keys, fingerprint_change

RUN_IDENTITY_KEY = "covidct_run"  # a checkpoint's fold, split seed, grouping and data fingerprint
RUN_SETTINGS_KEY = "covidct_settings"  # a checkpoint's run's semantic config (run_settings): what resume_from checks
# what a run that resumes another's checkpoint sets differently from it, by its nature
RESUME_KEYS = ("resume_from", "warm_start")


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
    if any(isinstance(v, dict) and (v.get("next_batch") or {}).get("batch") for v in checkpoint.values()):
        raise ConfigError(
            f"checkpoint {path} stopped mid-epoch under an earlier covidct, which kept the loader's place where this "
            "one does not read it: resume it with the covidct that wrote it, or delete it to start the run again."
        )
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
    differs = sorted(key for key in differing_keys(theirs, mine) if key.split(".")[0] not in RESUME_KEYS)
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
    """Where a checkpoint resumes, in words: the epoch and batch it runs next (1-based), and its step, from
    Lightning's loop state (whether the epoch was done) and the training loader's (TrainLoader.state_dict)."""
    step = checkpoint.get("global_step", 0)
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    at = (loop.get("state_dict", {}).get("combined_loader") or [{}])[0]
    if loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", True) or "batch" not in at:
        epoch = int(checkpoint.get("epoch", 0)) + 1  # the next, 0-based
        if epoch >= max_epochs:
            return f"the end of training (step {step}): testing only"
        return f"the start of epoch {epoch + 1}/{max_epochs} (step {step})"
    return f"epoch {at['epoch'] + 1}/{max_epochs}, batch {at['batch'] + 1} (step {step})"
