"""Every option of a run checked before any work: one line naming the key and what it may be.

Hydra composes `fold=1.5` or `fold=abc` without complaint; without these checks such a value trains on the
wrong images or fails deep inside a library.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from covidct.data.datamodule import checked_repeat
from covidct.data.folds import N_FOLDS
from covidct.data.sites import split_sites
from covidct.errors import ConfigError

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
    "data.val_fraction": (0.0, True, None),
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
    if OmegaConf.select(cfg, "data.val_fraction", default=0) >= 1:
        raise ConfigError(f"data.val_fraction must be below 1, got {cfg.data.val_fraction!r}.")
    names = _site_names(cfg, "data.sites")
    if not names:
        raise ConfigError("data.sites must name one or more sites, e.g. data.sites=[A,B] or [A,B,my_hospital].")
    outside = OmegaConf.select(cfg, "data.allow_outside_root", default=False)
    if not isinstance(outside, bool):
        raise ConfigError(f"data.allow_outside_root must be true or false, got {outside!r}.")
    held_out, given = _site_names(cfg, "data.test_sites"), _plain(cfg, "data.site_specs")
    trained, held = split_sites(names, held_out, given, allow_outside_root=outside)
    checked_repeat(_plain(cfg, "data.repeat"), [*trained, *held])
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches", default=None)
    bad_fraction = isinstance(limit, float) and limit > 1
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0 or bad_fraction
    ):
        raise ConfigError(
            "trainer.limit_train_batches must be null (every batch), an integer >= 1 or a fraction in (0, 1], "
            f"got {limit!r}: a run that trains nothing writes no record."
        )
