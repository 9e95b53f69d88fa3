"""Site-specific residual adapters (Rebuffi et al. 2017, 2018) around shared convolutions.

series   (NeurIPS 2017): y = conv(x);  out = y + A_site(BN'_site(y))   -> then the site's BN
         (Rebuffi et al.'s BN(y + conv1x1(BN'(y))), with the inner BN' before the adapter conv)
parallel (CVPR 2018):    out = conv(x) + A_site(x)            -> then the site's BN
A_site is a 1x1 convolution owned by one site (at the shared conv's stride in parallel mode); each
sample goes through its own site's adapter, in training and at test time.
"""

from __future__ import annotations

import torch
from torch import nn

from covidct.models.norms import SiteBatchNorm
from covidct.models.routing import Sites, route

ADAPTER_MODES = ("none", "series", "parallel")


class SiteConv1x1(nn.Module):
    """One 1x1 convolution per site; each sample goes through its own site's convolution."""

    def __init__(self, c_in: int, c_out: int, num_sites: int, stride: int = 1):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) for _ in range(num_sites))
        for conv in self.convs:
            nn.init.zeros_(conv.weight)  # start as the identity residual: the shared path alone

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        if len(self.convs) == 1:
            return self.convs[0](x)
        return route(x, sites, self.convs)


class AdaptedConv(nn.Module):
    """A shared convolution with an optional site-specific series or parallel 1x1 adapter."""

    def __init__(self, conv: nn.Conv2d, mode: str = "none", num_sites: int = 1):
        super().__init__()
        if mode not in ADAPTER_MODES:
            raise ValueError(f"adapter mode must be one of {ADAPTER_MODES}, got {mode!r}")
        self.conv = conv
        self.mode = mode
        self.inner_norm = None
        if mode == "series":
            self.inner_norm = SiteBatchNorm(conv.out_channels, num_sites)
            self.adapter = SiteConv1x1(conv.out_channels, conv.out_channels, num_sites)
        elif mode == "parallel":
            self.adapter = SiteConv1x1(conv.in_channels, conv.out_channels, num_sites, stride=conv.stride[0])
        else:
            self.adapter = None

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        if self.mode == "series":
            y = self.conv(x)
            return y + self.adapter(self.inner_norm(y, sites), sites)
        if self.mode == "parallel":
            return self.conv(x) + self.adapter(x, sites)
        return self.conv(x)
