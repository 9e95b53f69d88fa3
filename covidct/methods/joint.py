"""Joint: one network on both sites' mixed batches, norms shared (the naive baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from covidct.methods.base import SiteMethod
from covidct.models.routing import Sites, batch_sites


class Joint(SiteMethod):
    """Its backbone decides what is per site: SepNorm and the adapters are Joint with site norms/adapters."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.net = self.make_backbone()

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.net(batch["image"], batch_sites(batch)), batch["label"])
        return {"loss": ce, "ce": ce}

    def logits(self, image: torch.Tensor, sites: Sites) -> torch.Tensor:
        return self.net(image, sites)
