"""Scoring a site's images with a trained method: P(COVID) through one site's branch, the prediction rows run
records hold, and a site the method never saw under each of its norm choices (models/unseen.py), with their
metrics. The test step of training (methods/base.py), leave-one-site-out runs (covidct.run) and
`python -m covidct.evaluate` share these, so a record and a re-evaluation of its checkpoint agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from covidct.data.sources import Sample
from covidct.errors import DataError
from covidct.methods import SiteMethod
from covidct.models.routing import SiteBlocks
from covidct.models.unseen import unseen_choices, unseen_site_model
from covidct.records import UNSEEN_COLUMN


@torch.inference_mode()
def site_probabilities(method: SiteMethod, index: int, images: Iterable[torch.Tensor]) -> list[float]:
    """P(COVID) of every image, routed to site `index`, as the test step computes it."""
    route = SiteBlocks.single(index)
    probs: list[float] = []
    for batch in images:
        probs += method.prob_covid(batch, route).tolist()
    return probs


def unseen_site_rows(
    method: SiteMethod,
    site: str,
    samples: Sequence[Sample],
    images: Callable[[], Iterable[torch.Tensor]],
    choices: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Prediction rows of a site the method never saw, one set per norm choice (each row names its choice)."""
    rows = []
    for how in choices or unseen_choices(method):
        net, index, seen = unseen_site_model(method, how, images)
        if how == "adabn" and seen < 2:
            raise DataError("unseen_norm=adabn needs at least 2 images of the site to estimate its statistics.")
        probs = site_probabilities(net, index, images())
        if len(probs) != len(samples):
            raise RuntimeError(f"{len(probs)} predictions for {len(samples)} images of site {site}")
        rows += [{**prediction_row(s, p), UNSEEN_COLUMN: how} for s, p in zip(samples, probs)]
    return rows


def prediction_row(sample: Sample, prob_covid: float) -> dict[str, Any]:
    """A test prediction as run records hold it (predictions.csv, without its selection)."""
    return {
        "site": sample.site,
        "file": sample.name,
        "patient": sample.patient,
        "label": sample.label,
        "prob_covid": prob_covid,
    }
