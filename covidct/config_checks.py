"""Every option of a run checked before any work: one line naming the key and what it may be.

Hydra composes `fold=1.5` or `fold=abc` without complaint; without these checks such a value trains on the
wrong images or fails deep inside a library. RunOptions, a schema, holds options to a type and a range; a copy of
them is checked (merged into the run's config, a schema would add keys and so change every run id), strictly: the
run reads them as written, so OmegaConf's 3 for the text '3' is refused.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from covidct.data.folds import MAX_VAL_FRACTION, N_FOLDS
from covidct.data.sites import checked_repeat, split_sites
from covidct.errors import ConfigError
from covidct.pseudonyms import Pseudonyms
from covidct.resolvers import without_environment
from covidct.run_folder import differing_keys, semantic_config
from covidct.schemas import checked, dotted, rule

FP16_AUTOCAST = ("16", "16-mixed")  # Lightning's names of fp16 mixed precision
SEED_MAX = 2**32 - 1  # the largest seed numpy (and so Lightning's seed_everything) accepts
SITES = "a list of site names, each named once"
MIN_IMAGE_SIZE = 32
MIN_BATCH_PER_SITE = 2  # each site's BatchNorm needs 2 samples


def _integer(low: int, high: int | None = None, block: str = "", null: str = "") -> Any:
    allowed = f"be an integer in {low}..{high}" if high is not None else f"be an integer >= {low}"
    return rule(allowed + null, lambda v: low <= v and (high is None or v <= high), None if null else low, block)


def _number(low: float, included: bool = False, high: float | None = None, block: str = "") -> Any:
    bound = (f">= {low:g}" if included else f"> {low:g}") + (f" and <= {high:g}" if high is not None else "")
    test = lambda v: math.isfinite(v) and (v > low or included and v == low) and (high is None or v <= high)  # noqa: E731
    return rule(f"be a finite number {bound}", test, None, block)


@dataclass
class RunOptions:
    """The run options held to a type (OmegaConf's check) and a range (each field's rule), by key in its block."""

    fold: int = _integer(0, N_FOLDS - 1)
    seed: int = _integer(0, SEED_MAX)
    split_seed: int = _integer(0, SEED_MAX)
    max_epochs: int = _integer(1, block="trainer")
    image_size: int = _integer(MIN_IMAGE_SIZE, block="data")
    batch_per_site: int = _integer(MIN_BATCH_PER_SITE, block="data")
    eval_batch_size: int = _integer(1, block="data")
    num_workers: int | None = _integer(0, block="data", null=" (or null for the default)")
    val_fraction: float | None = _number(0.0, True, MAX_VAL_FRACTION, "data")  # above, 1 / v parts would hold 1/2
    allow_outside_root: bool = rule("be true or false", default=False, block="data")
    # a list, each site once: `data.sites=A` (no brackets) would iterate its letters
    sites: tuple[str, ...] = rule(f"be {SITES}, e.g. data.sites=[A,B]", lambda s: 0 < len(s) == len(set(s)), (), "data")
    test_sites: tuple[str, ...] | None = rule(f"be {SITES}, e.g. [B]", lambda s: len(s) == len(set(s)), None, "data")
    tau: float | None = _number(0.0, block="model")
    alpha: float | None = _number(0.0, True, block="model")
    kt_weight: float | None = _number(0.0, True, 1.0, "model")  # MS-Net: the label term is weighted 1 - kt_weight
    lr: float | None = _number(0.0, block="model.optimizer")
    weight_decay: float | None = _number(0.0, True, block="model.optimizer")
    width: float | None = _number(0.0, block="model.backbone")  # a width <= 0 would be clamped to 4 channels


def _plain(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _check_no_environment_in_results(cfg: DictConfig) -> None:
    """A value that changes results (one the run id covers) may not come from the environment: run_config.json
    and the run id store such values resolved, so the environment would be copied into them. The environment says
    only where things are (data.root, paths, the cache), which records keep as written (resolvers.py)."""
    key = min(differing_keys(semantic_config(cfg), semantic_config(without_environment(cfg))), default="")
    if key:
        raise ConfigError(
            f"{key} reads the environment (${{oc.env:...}}), but it changes results: write its value in the config "
            f"or on the command line (e.g. {key}=$VARIABLE in the shell), where the record and the run id state it."
        )


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError, naming the key and its allowed values, for the first invalid option."""
    found = {spec.name: _plain(cfg, dotted(spec), MISSING) for spec in fields(RunOptions)}
    options = checked(RunOptions, {key: value for key, value in found.items() if value is not MISSING}, "", strict=True)
    Pseudonyms(OmegaConf.select(cfg, "patient_ids", default="pseudonym"), OmegaConf.select(cfg, "pseudonym_key"))
    held_out, given = options["test_sites"] or [], _plain(cfg, "data.site_specs")
    trained, held = split_sites(options["sites"], held_out, given, allow_outside_root=options["allow_outside_root"])
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
