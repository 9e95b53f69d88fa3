"""The config's own interpolations, registered once for the CLI, the tests and the bench alike."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from covidct.data.sites import INTERPOLATION, split_sites
from covidct.errors import ConfigError
from covidct.run_folder import run_id

NO_EXPERIMENT = "adhoc"


def experiment_name() -> str:
    """`name`: the experiment chosen with experiment=NAME, so no experiment file restates its own name."""
    if not HydraConfig.initialized():
        return NO_EXPERIMENT
    return HydraConfig.get().runtime.choices.get("experiment") or NO_EXPERIMENT


def num_sites(sites: Sequence[str], *, _root_: DictConfig) -> int:
    """`${num_sites:${data.sites}}`: a per-site part gets one copy per training site of the data (the sites
    of data.test_sites, which it never trains on, have none).

    Sites that cannot be resolved (an unknown one, one named twice, none left to train on) count as listed:
    Hydra resolves this while it names the run folder (the run id), before any of covidct's code runs, where
    an error would be a library traceback; the run's own check_config then refuses the same sites in one line
    before any work, so the count is never used."""
    held_out = OmegaConf.select(_root_, "data.test_sites", default=None)
    if not held_out:
        return len(sites)
    given = OmegaConf.select(_root_, "data.site_specs", default=None)
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else given
    outside = OmegaConf.select(_root_, "data.allow_outside_root", default=False) is True
    try:
        return len(split_sites(list(sites), list(held_out), given, allow_outside_root=outside)[0])
    except ConfigError:
        return len(sites)


# `${oc.env:...}`, the one resolver OmegaConf and Hydra register that reads the environment (covidct's read none);
# OmegaConf has no API that lists the resolvers a value calls, so its text is matched
READS_ENVIRONMENT = re.compile(r"\$\{\s*oc\.env\s*:")


def _as_written_if_environment(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _as_written_if_environment(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_as_written_if_environment(value) for value in node]
    if isinstance(node, str) and READS_ENVIRONMENT.search(node):
        return INTERPOLATION.sub(r"\\${", node)  # escaped: OmegaConf keeps it as text
    return node


def without_environment(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` in which every value that reads the environment is its text as written
    (`${oc.env:COVIDCT_DATA,data}`); every other interpolation resolves as before, one that refers to such a value
    getting that text. Records store this, so they say where a value came from, never what this machine's
    environment holds (a token, a home folder)."""
    return OmegaConf.create(_as_written_if_environment(OmegaConf.to_container(cfg, resolve=False)))


def recorded_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as run records and loggers store it: resolved, but environment reads as written."""
    return OmegaConf.to_container(without_environment(cfg), resolve=True)


for _name, _resolver in (
    ("covidct_run_id", run_id),
    ("covidct_experiment", experiment_name),
    ("num_sites", num_sites),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
