"""Per-sample routing to a site's own module, the mechanism behind DSBN and site adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
