"""Per-sample routing to a site's own module, the mechanism behind DSBN and site adapters.

Three implementations compute the same function; the first that applies is used:
- blocks: the batch declares (`site_blocks`) that it holds one contiguous run per site, as every batch
  of the DataModule does (16 of A then 16 of B; eval batches hold one site). Each site's module runs on
  its slice: exact compute, static shapes, no host sync, the same gradients as indexed routing;
- sync-free (`model.speed.sync_free_routing`): masks instead of indices, for mixed batches that
  declare nothing, with static shapes and no host sync. Site parameters of a site absent from a batch
  get zero gradients rather than none;
- indexed: each site's module runs on `index_select`ed samples; finding the indices (`nonzero`) waits
  for the device, once per routed layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

SiteLayout = tuple[tuple[int, ...], tuple[int, ...]]  # (site of each block, size of each block)
_layout: SiteLayout | None = None


@contextmanager
def site_blocks(layout: SiteLayout | None) -> Iterator[None]:
    """Declare the block layout of the batch that the enclosed forward passes process."""
    global _layout
    previous, _layout = _layout, layout
    try:
        yield
    finally:
        _layout = previous


def declared_layout(x: torch.Tensor) -> SiteLayout | None:
    """The declared layout if it describes x's batch (not, e.g., a subset of one site's rows).

    A one-site layout holds for any part of the batch too, and is read without its size, so a compiled
    model is not specialised to each evaluation batch size.
    """
    if _layout is None:
        return None
    sites, sizes = _layout
    if len(sites) == 1:
        return sites, (x.shape[0],)
    return _layout if x.shape[0] == sum(sizes) else None


def site_rows(x: torch.Tensor, site: torch.Tensor) -> Iterator[tuple[int, slice | torch.Tensor]]:
    """(site, its rows of x) for each site in the batch: the declared blocks' slices (no host sync),
    else indices found with `nonzero` (one host sync per site)."""
    layout = declared_layout(x)
    if layout is not None:
        start = 0
        for s, size in zip(*layout):
            yield s, slice(start, start + size)
            start += size
        return
    for s in site.unique(sorted=True).tolist():
        yield s, (site == s).nonzero(as_tuple=True)[0]


def route_by_blocks(x: torch.Tensor, modules: Sequence[nn.Module], layout: SiteLayout) -> torch.Tensor:
    """modules[s] on each site block of x (a layout from `declared_layout(x)`)."""
    sites, sizes = layout
    if len(sites) == 1:
        return modules[sites[0]](x)
    return torch.cat([modules[s](chunk) for s, chunk in zip(sites, x.split(list(sizes)))])


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
