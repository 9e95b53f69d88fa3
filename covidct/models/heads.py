"""Dense heads on the pooled embedding: the classifier and the contrastive projection H."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from covidct.models.norms import NormAct
from covidct.models.routing import Sites


class SiteMLP(nn.Module):
    """Linear layers, each but the last (or all, with `act_last`) followed by site-routed BN + ReLU."""

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        num_sites: int = 1,
        norm: bool = True,
        act: bool = True,
        act_last: bool = False,
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        self.norm_acts = nn.ModuleList()
        for i, out_dim in enumerate(dims):
            self.linears.append(nn.Linear(in_dim, out_dim))
            last = i == len(dims) - 1
            self.norm_acts.append(
                NormAct(out_dim, num_sites, norm=norm, act=act, dim=1) if not last or act_last else nn.Identity()
            )
            in_dim = out_dim
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        for linear, norm_act in zip(self.linears, self.norm_acts):
            x = linear(x)
            x = norm_act(x, sites) if isinstance(norm_act, NormAct) else x
        return x


def classifier_head(in_dim: int, num_classes: int = 2, num_sites: int = 1, norm: bool = True) -> SiteMLP:
    """FC 1024 -> FC 256 -> FC num_classes on logits (the authors' Sigmoid before cross-entropy is dropped)."""
    return SiteMLP(in_dim, (1024, 256, num_classes), num_sites, norm=norm)


def projection_head(in_dim: int, num_sites: int = 1, hidden: int = 1024, out_dim: int = 128) -> SiteMLP:
    """H of the paper: FC 1024 -> FC 128, each with site BN + ReLU as in the authors' code."""
    return SiteMLP(in_dim, (hidden, out_dim), num_sites, norm=True, act_last=True)
