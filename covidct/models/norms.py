"""Site-routed normalisation: one BatchNorm per site (DSBN), or one shared, each sample routed by its site."""

from __future__ import annotations

import torch
from torch import nn

from covidct.models.routing import (
    SiteLayout,
    SiteRouted,
    declared_layout,
    route_by_blocks,
    route_by_site,
    site_one_hot,
)


class SiteBatchNorm(SiteRouted):
    """BatchNorm with its own affine parameters and running statistics for each site.

    In training each site's BN sees only that site's samples of the batch; at test time each sample is
    normalised with its own site's running statistics. With num_sites=1 it is a plain shared BatchNorm.
    The parameters live in `norms[s]` (nn.BatchNorm) under every routing (models/routing.py).
    """

    def __init__(self, num_features: int, num_sites: int = 1, dim: int = 2):
        super().__init__()
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
        self.norms = nn.ModuleList(bn(num_features) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.norms)

    def forward(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        if self.num_sites == 1:
            return self.norms[0](x)
        layout = declared_layout(x)
        if self.training and x.dim() == 2:
            self._check_two_samples_per_site(layout, site)
        if layout is not None:
            return route_by_blocks(x, self.norms, layout)
        if self.sync_free:
            return self._masked(x, site)
        return route_by_site(x, site, self.norms)

    def _check_two_samples_per_site(self, layout: SiteLayout | None, site: torch.Tensor) -> None:
        if layout is not None:
            sizes = layout[1]
        elif self.sync_free:
            return  # it cannot look without a host sync; the DataModule keeps batch_per_site >= 2
        else:
            sizes = torch.bincount(site).tolist()
        if 1 in sizes:
            raise ValueError(
                "a site has a single sample in this training batch: its BatchNorm needs at least 2 "
                "(the authors' code silently dropped such sites; batches here hold batch_per_site per site)"
            )

    def _masked(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """Per-site batch statistics by masked sums: nn.BatchNorm's numerics without host syncs.

        Statistics are computed in float32 (as cuDNN does for bf16 inputs), biased for normalising
        and unbiased for the running variance; a site absent from the batch keeps its running stats.
        """
        norms = self.norms
        weight = torch.stack([n.weight for n in norms])  # (S, C)
        bias = torch.stack([n.bias for n in norms])
        spatial = tuple(range(2, x.dim()))
        expand = (...,) + (None,) * len(spatial)  # (N, C) -> (N, C, 1, 1)
        if not self.training:
            mean = torch.stack([n.running_mean for n in norms])[site]
            var = torch.stack([n.running_var for n in norms])[site]
            scale = torch.rsqrt(var + norms[0].eps) * weight[site]
            return ((x.float() - mean[expand]) * scale[expand] + bias[site][expand]).to(x.dtype)
        one_hot = site_one_hot(site, len(norms))  # (N, S)
        per_sample = x[0, 0].numel()
        count = one_hot.sum(0) * per_sample  # values per channel per site, (S,)
        xf = x.float()
        sums = xf.sum(spatial) if spatial else xf  # (N, C)
        mean = (one_hot[:, :, None] * sums[:, None, :]).sum(0) / count.clamp_min(1)[:, None]  # (S, C)
        centred = xf - mean[site][expand]
        squares = (centred * centred).sum(spatial) if spatial else centred * centred
        var = (one_hot[:, :, None] * squares[:, None, :]).sum(0) / count.clamp_min(1)[:, None]
        scale = torch.rsqrt(var[site] + norms[0].eps) * weight[site]
        out = (centred * scale[expand] + bias[site][expand]).to(x.dtype)
        self._update_running_stats(mean.detach(), var.detach() * (count / (count - 1).clamp_min(1))[:, None], count)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor, count: torch.Tensor) -> None:
        present = count > 0
        for s, norm in enumerate(self.norms):
            for running, batch_value in ((norm.running_mean, mean[s]), (norm.running_var, unbiased_var[s])):
                running.copy_(torch.where(present[s], running.lerp(batch_value, norm.momentum), running))
            norm.num_batches_tracked.add_(present[s].long())


class NormAct(nn.Module):
    """Optional site-routed BatchNorm, then optional ReLU: the unit the redesign adds after convs and FCs."""

    def __init__(self, num_features: int, num_sites: int = 1, norm: bool = True, act: bool = True, dim: int = 2):
        super().__init__()
        self.norm = SiteBatchNorm(num_features, num_sites, dim) if norm else None
        self.act = nn.ReLU(inplace=False) if act else nn.Identity()

    def forward(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x, site)
        return self.act(x)
