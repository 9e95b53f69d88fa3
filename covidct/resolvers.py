"""The config's own interpolations, registered once for the CLI, the tests and the bench alike."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from covidct.resume import run_id

NO_EXPERIMENT = "adhoc"


def experiment_name() -> str:
    """`name`: the experiment chosen with experiment=NAME, so no experiment file restates its own name."""
    if not HydraConfig.initialized():
        return NO_EXPERIMENT
    return HydraConfig.get().runtime.choices.get("experiment") or NO_EXPERIMENT


def num_sites(sites: Sequence[str]) -> int:
    """`${num_sites:${data.sites}}`: a per-site part gets one copy per site of the data."""
    return len(sites)


for _name, _resolver in (
    ("covidct_run_id", run_id),
    ("covidct_experiment", experiment_name),
    ("num_sites", num_sites),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
