"""Per-sample routing to a site's own module, the mechanism behind DSBN and site adapters.

Two implementations compute the same function:
- indexed (default): each site's module runs on `index_select`ed samples. Exact compute, but finding
  the indices (`nonzero`) waits for the device, once per routed layer;
- sync-free (`model.speed.sync_free_routing`): masks instead of indices, so the step never waits for
  the device and can be compiled or captured as a CUDA graph with static shapes. Site parameters of a
  site that is absent from a batch then get zero gradients rather than none; every training batch of
  the two-site sampler holds both sites, so that changes nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SiteRouted(nn.Module):
    """Base of the modules that route samples by site; `sync_free` picks the implementation."""

    sync_free: bool = False


def use_sync_free_routing(model: nn.Module, enabled: bool = True) -> None:
    """Switch every site-routed layer of `model` to (or from) the sync-free implementation."""
    for module in model.modules():
        if isinstance(module, SiteRouted):
            module.sync_free = enabled


def route_by_site(x: torch.Tensor, site: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor:
    """modules[s] applied to the samples whose site is s, results back in batch order.

    Each module sees only its own site's samples, so batch statistics never mix sites.
    """
    out = None
    for s, module in enumerate(modules):
        index = (site == s).nonzero(as_tuple=True)[0]
        if index.numel() == 0:
            continue
        y = module(x.index_select(0, index))
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, index, y)
    return modules[0](x) if out is None else out


def site_one_hot(site: torch.Tensor, num_sites: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, num_sites) indicator of each sample's site; a sync-free stand-in for index lists."""
    return (site[:, None] == torch.arange(num_sites, device=site.device)).to(dtype)
