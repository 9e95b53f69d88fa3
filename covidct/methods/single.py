"""Single: one independent network per site, trained in one run, each only on its own site's images."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidct.errors import ConfigError
from covidct.methods.base import SiteMethod
from covidct.models.routing import SiteBlocks, Sites, batch_sites, site_rows


class Single(SiteMethod):
    """Nothing is shared; gradients are clipped per network, so the networks stay independent."""

    networks_per_site = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.backbone_config.get("num_sites", 1) != 1:
            raise ConfigError("Single trains one network per site: its model.backbone.num_sites must be 1.")
        self.nets = nn.ModuleDict({site: self.make_backbone() for site in self.sites})

    def _routed(self, image: torch.Tensor, sites: Sites) -> Iterator[tuple[str, Any, torch.Tensor]]:
        for s, rows in site_rows(sites, len(image)):
            name = self.sites[s]
            yield name, rows, self.nets[name](image[rows], SiteBlocks.single(0))

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        losses = {
            f"ce_{name}": F.cross_entropy(logits, batch["label"][rows])
            for name, rows, logits in self._routed(batch["image"], batch_sites(batch))
        }
        return {"loss": sum(losses.values()), **losses}

    def logits(self, image: torch.Tensor, sites: Sites) -> torch.Tensor:
        out = image.new_zeros(len(image), 2)
        for _, rows, logits in self._routed(image, sites):
            out[rows] = logits.to(out.dtype)
        return out

    def cam_layer(self, site: str) -> nn.Module:
        return self.nets[site].stages[-1][-1]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        return [list(net.parameters()) for net in self.nets.values()]
