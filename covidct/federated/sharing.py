"""Which entries of a model's state a site shares, by kind (BatchNorm affine parameters and running statistics),
and an aggregate back in an entry's dtype."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_keys(model: nn.Module, statistics_only: bool = False) -> set[str]:
    """The state-dict keys of every BatchNorm of `model` (with `statistics_only`, its running statistics)."""
    return {
        f"{name}.{entry}"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for entry in module.state_dict()
        if not statistics_only or entry in STATISTICS
    }


def as_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An aggregate in a state entry's dtype: an integer one (BatchNorm's num_batches_tracked, averaged in floating
    point, e.g. 0.99999...) rounded, not truncated."""
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)
