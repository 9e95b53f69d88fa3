"""Per-sample routing to a site's own module, the mechanism behind DSBN and site adapters.

A routed layer is told, with its input, where each sample comes from (`Sites`):
- `SiteBlocks`: the batch holds one contiguous run per site, as every DataModule batch does (16 of A then
  16 of B; evaluation batches hold one site). Each site's module runs on its slice: static shapes and no
  host sync, which a compiled or captured step needs;
- a tensor of site indices, for batches that declare nothing (e.g. images gathered by hand): each site's
  module runs on its `index_select`ed samples; finding them (`nonzero`) waits for the device once per site.
Both compute the same function, with the same gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn


class SiteBlocks(NamedTuple):
    """Sites of a batch of contiguous runs: `sites[i]` for the next `sizes[i]` samples.

    A one-site batch is described without its size, so it holds for any part of the batch, and a
    compiled model is not specialised to each evaluation batch size.
    """

    sites: tuple[int, ...]
    sizes: tuple[int, ...] = ()

    @classmethod
    def single(cls, site: int) -> SiteBlocks:
        return cls((site,))


Sites = SiteBlocks | torch.Tensor


def batch_sites(batch: Mapping[str, Any]) -> Sites:
    """How a batch's samples route: its declared blocks (the DataModule's collate) if any, else its site tensor."""
    layout = batch.get("site_layout")
    return SiteBlocks(*layout) if layout is not None else batch["site"]


def site_rows(sites: Sites, batch_size: int) -> Iterator[tuple[int, slice | torch.Tensor]]:
    """(site, its rows) for each site of a batch: slices of declared blocks, else indices found with `nonzero`."""
    if isinstance(sites, SiteBlocks):
        if len(sites.sites) == 1:
            yield sites.sites[0], slice(0, batch_size)
            return
        if sum(sites.sizes) != batch_size:
            raise ValueError(f"site blocks {sites} do not describe a batch of {batch_size}")
        start = 0
        for site, size in zip(sites.sites, sites.sizes):
            yield site, slice(start, start + size)
            start += size
        return
    for site in sites.unique(sorted=True).tolist():
        yield site, (sites == site).nonzero(as_tuple=True)[0]


def samples_per_site(sites: Sites) -> list[int]:
    """How many samples each site present has (a host sync for a site tensor)."""
    if isinstance(sites, SiteBlocks):
        return list(sites.sizes)
    return [n for n in torch.bincount(sites).tolist() if n]


def route(x: torch.Tensor, sites: Sites, modules: Sequence[nn.Module]) -> torch.Tensor:
    """modules[s] applied to the samples of site s, results back in batch order.

    Each module sees only its own site's samples, so batch statistics never mix sites.
    """
    if isinstance(sites, SiteBlocks):
        if len(sites.sites) == 1:
            return modules[sites.sites[0]](x)
        if sum(sites.sizes) != x.shape[0]:
            raise ValueError(f"site blocks {sites} do not describe a batch of {x.shape[0]}")
        return torch.cat([modules[s](chunk) for s, chunk in zip(sites.sites, x.split(list(sites.sizes)))])
    out = None
    for s, index in site_rows(sites, x.shape[0]):
        y = modules[s](x.index_select(0, index))
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, index, y)
    return modules[0](x) if out is None else out
