"""Site-routed normalisation: one BatchNorm per site (DSBN), or one shared."""

from __future__ import annotations

import torch
from torch import nn

from covidct.models.routing import Sites, route, samples_per_site


class SiteBatchNorm(nn.Module):
    """BatchNorm with its own affine parameters and running statistics for each site.

    In training each site's BN sees only that site's samples of the batch; at test time each sample is
    normalised with its own site's running statistics. With num_sites=1 it is a plain shared BatchNorm.
    """

    def __init__(self, num_features: int, num_sites: int = 1, dim: int = 2):
        super().__init__()
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
        self.norms = nn.ModuleList(bn(num_features) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.norms)

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        if self.num_sites == 1:
            return self.norms[0](x)
        if self.training and x.dim() == 2 and 1 in samples_per_site(sites):
            raise ValueError(
                "a site has a single sample in this training batch: its BatchNorm needs at least 2 "
                "(the authors' code silently dropped such sites; batches here hold batch_per_site per site)"
            )
        return route(x, sites, self.norms)


class NormAct(nn.Module):
    """Optional site-routed BatchNorm, then optional ReLU: the unit the redesign adds after convs and FCs."""

    def __init__(self, num_features: int, num_sites: int = 1, norm: bool = True, act: bool = True, dim: int = 2):
        super().__init__()
        self.norm = SiteBatchNorm(num_features, num_sites, dim) if norm else None
        self.act = nn.ReLU(inplace=False) if act else nn.Identity()

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x, sites)
        return self.act(x)
