"""Joint: one network on both sites' mixed batches, norms shared (the naive baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from covidct.methods.base import SiteMethod


class Joint(SiteMethod):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.net = self.make_backbone()

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.net(batch["image"], batch["site"]), batch["label"])
        return {"loss": ce, "ce": ce}

    def logits(self, image: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.net(image, site)
