"""A hospital that never trained in the federation (data.test_sites): it receives the final model and classifies
every one of its images under each norm choice the strategy leaves it (covidct/models/unseen.py), at its own node.

What a choice needs decides what it is sent. FedAvg and FedProx share every weight: the global model serves any
site as it is (`shared`). FedBN and SiloBN keep norms (or their statistics) at each site, so each training site
sends what it kept, once, after the last round, and the new site gets the choices of a network with one norm copy
per training site, as a centralised SepNorm's: `adabn` (the mean affine, statistics from its own images), `mean`
and `site:<name>`. Local shares nothing: the new site borrows one site's whole network (`site:<name>`), as
Single's would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from covidct.errors import ConfigError
from covidct.federated.sharing import as_dtype
from covidct.records import UNSEEN_COLUMN
from covidct.scoring import prediction_row, site_probabilities, unseen_site_rows
from covidct.training.fit import build

NORM_COPY = re.compile(r"\.norms\.(\d+)\.")  # a site-routed BatchNorm's copy in a state-dict key


def unseen_site_predictions(
    cfg: DictConfig,
    datamodule: Any,
    site: str,
    trained: Sequence[str],
    shared: Mapping[str, torch.Tensor],
    kept: Mapping[str, Mapping[str, torch.Tensor]],
    local_keys: Callable[[nn.Module], set[str]],
) -> list[dict[str, Any]]:
    """Prediction rows (each naming its norm choice) of every image of `site`, never trained on, from the
    federation's final weights: `shared` (the server's) and what each of the `trained` sites `kept`
    (`local_keys`: the strategy's), read by the site's `datamodule` (all its images as its test part)."""
    datamodule.setup("test")
    samples = datamodule.splits[site]["test"]

    def images() -> Iterator[torch.Tensor]:
        for batch in datamodule.unseen_loader(site, 0):
            yield datamodule.on_after_batch_transfer(batch, 0)["image"]

    one = build(cfg.model, sites=[trained[0]], _convert_="all")
    local = local_keys(one)
    if not local:  # every weight shared: the global model as it is
        method = build(cfg.model, sites=list(trained), _convert_="all")
        _load(method, lambda key: shared[key])
        return unseen_site_rows(method.eval(), site, samples, images)
    if local == set(one.state_dict()):  # nothing shared: borrow one site's network
        rows = []
        for name in trained:
            _load(one, lambda key, name=name: kept[name][key])
            probs = site_probabilities(one.eval(), 0, images())
            rows += [{**prediction_row(s, p), UNSEEN_COLUMN: f"site:{name}"} for s, p in zip(samples, probs)]
        return rows
    method = build(_with_norm_copies(cfg.model, len(trained)), sites=list(trained), _convert_="all")
    _load(method, lambda key: _entry(key, trained, shared, kept, local))
    return unseen_site_rows(method.eval(), site, samples, images)


def _with_norm_copies(model: DictConfig, copies: int) -> DictConfig:
    """The experiment's network with one BatchNorm copy per training site (SepNorm's layout of the same layers)."""
    model = model.copy()
    with open_dict(model):
        model.backbone.num_sites = copies
    return model


def _entry(
    key: str,
    trained: Sequence[str],
    shared: Mapping[str, torch.Tensor],
    kept: Mapping[str, Mapping[str, torch.Tensor]],
    local: set[str],
) -> torch.Tensor:
    """A state entry of the per-site-copies network: copy i of a norm from training site i where that site kept
    it, anything else from the server's weights (a site's one copy is its copy 0)."""
    copy = NORM_COPY.search(key)
    source = key if copy is None else NORM_COPY.sub(".norms.0.", key, count=1)
    if source in local:
        if copy is None:
            raise ConfigError(
                f"the strategy keeps {key!r} at each site, outside any BatchNorm: no new site can have it."
            )
        return kept[trained[int(copy.group(1))]][source]
    return shared[source]


def _load(method: nn.Module, entry: Callable[[str], torch.Tensor]) -> None:
    """Every entry of `method`'s state from `entry(key)`, in the entry's dtype."""
    state = method.state_dict()
    method.load_state_dict({key: as_dtype(entry(key), value.dtype) for key, value in state.items()})
