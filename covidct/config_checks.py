"""Every option of a run checked before any work: one line naming the key and what it may be.

Hydra composes `fold=1.5` or `fold=abc` without complaint; without these checks such a value trains on the
wrong images or fails deep inside a library.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from covidct.data.datamodule import checked_repeat
from covidct.data.folds import MAX_VAL_FRACTION, N_FOLDS
from covidct.data.sites import split_sites
from covidct.errors import ConfigError
from covidct.pseudonyms import Pseudonyms
from covidct.resolvers import without_environment
from covidct.resume import semantic_config

FP16_AUTOCAST = ("16", "16-mixed")  # Lightning's names of fp16 mixed precision
SEED_MAX = 2**32 - 1  # the largest seed numpy (and so Lightning's seed_everything) accepts
# key -> (smallest allowed, largest allowed or None, null allowed)
INTEGER_OPTIONS: dict[str, tuple[int, int | None, bool]] = {
    "fold": (0, N_FOLDS - 1, False),
    "seed": (0, SEED_MAX, False),
    "split_seed": (0, SEED_MAX, False),
    "trainer.max_epochs": (1, None, False),
    "data.image_size": (32, None, False),
    "data.batch_per_site": (2, None, False),
    "data.eval_batch_size": (1, None, False),
    "data.num_workers": (0, None, True),
}
# key -> (lower bound, bound included, upper bound (included) or None): a finite number in that range
NUMBER_OPTIONS: dict[str, tuple[float, bool, float | None]] = {
    "model.optimizer.lr": (0.0, False, None),
    "model.optimizer.weight_decay": (0.0, True, None),
    "model.tau": (0.0, False, None),
    "model.alpha": (0.0, True, None),
    "model.kt_weight": (0.0, True, 1.0),  # MS-Net: the label term is weighted 1 - kt_weight
    "model.backbone.width": (0.0, False, None),  # a width <= 0 would be clamped to 4 channels, silently
    "data.val_fraction": (0.0, True, MAX_VAL_FRACTION),  # above it, round(1 / v) parts would still hold out 1/2
}


def _allowed(low: int, high: int | None) -> str:
    return f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _site_names(cfg: DictConfig, key: str) -> list[str]:
    """A list of site names, or a ConfigError: `data.sites=A` (no brackets) would iterate its letters."""
    value = _plain(cfg, key)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of site names, e.g. {key}=[A,B]; got {value!r}.")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} names a site more than once: {value}.")
    return value


def _first_difference(ours: Any, theirs: Any, prefix: str = "") -> str:
    """The first dotted key at which two plain configs differ ('' if equal)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            found = _first_difference(ours.get(key), theirs.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return prefix.rstrip(".") if ours != theirs else ""


def _check_no_environment_in_results(cfg: DictConfig) -> None:
    """A value that changes results (one the run id covers) may not come from the environment: run_config.json
    and the run id store such values resolved, so the environment would be copied into them. The environment says
    only where things are (data.root, paths, the cache), which records keep as written (resolvers.py)."""
    key = _first_difference(semantic_config(cfg), semantic_config(without_environment(cfg)))
    if key:
        raise ConfigError(
            f"{key} reads the environment (${{oc.env:...}}), but it changes results: write its value in the config "
            f"or on the command line (e.g. {key}=$VARIABLE in the shell), where the record and the run id state it."
        )


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError, naming the key and its allowed values, for the first invalid option."""
    for key, (low, high, nullable) in INTEGER_OPTIONS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and (nullable or OmegaConf.select(cfg, key, default="absent") == "absent"):
            continue
        if not _is_integer(value) or value < low or (high is not None and value > high):
            null = " (or null for the default)" if nullable else ""
            raise ConfigError(f"{key} must be {_allowed(low, high)}{null}, got {value!r}.")
    for key, (low, inclusive, high) in NUMBER_OPTIONS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not valid or value < low or (value == low and not inclusive) or (high is not None and value > high):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            bound += f" and <= {high:g}" if high is not None else ""
            raise ConfigError(f"{key} must be a finite number {bound}, got {value!r}.")
    Pseudonyms(OmegaConf.select(cfg, "patient_ids", default="pseudonym"), OmegaConf.select(cfg, "pseudonym_key"))
    names = _site_names(cfg, "data.sites")
    if not names:
        raise ConfigError("data.sites must name one or more sites, e.g. data.sites=[A,B] or [A,B,my_hospital].")
    outside = OmegaConf.select(cfg, "data.allow_outside_root", default=False)
    if not isinstance(outside, bool):
        raise ConfigError(f"data.allow_outside_root must be true or false, got {outside!r}.")
    held_out, given = _site_names(cfg, "data.test_sites"), _plain(cfg, "data.site_specs")
    trained, held = split_sites(names, held_out, given, allow_outside_root=outside)
    checked_repeat(_plain(cfg, "data.repeat"), [*trained, *held])
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="auto"))
    on_cpu = OmegaConf.select(cfg, "trainer.accelerator", default="auto") == "cpu" or not torch.cuda.is_available()
    if precision in FP16_AUTOCAST and on_cpu:  # Lightning would run bf16 there instead, with a warning
        raise ConfigError(
            f"trainer.precision={precision} is fp16 autocast, which needs a GPU: on a CPU Lightning would run "
            "bf16-mixed instead. Choose trainer.precision=bf16-mixed or 32-true."
        )
    _check_no_environment_in_results(cfg)
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches", default=None)
    bad_fraction = isinstance(limit, float) and limit > 1
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0 or bad_fraction
    ):
        raise ConfigError(
            "trainer.limit_train_batches must be null (every batch), an integer >= 1 or a fraction in (0, 1], "
            f"got {limit!r}: a run that trains nothing writes no record."
        )
