"""SiloBN (Andreux et al. 2020): BatchNorm running statistics stay at their site, the affine parameters are
shared with everything else (FedAvg)."""

from __future__ import annotations

from torch import nn

from covidct.federated.sharing import batchnorm_keys
from covidct.federated.strategies.fedavg import FedAvg


class SiloBN(FedAvg):
    @staticmethod
    def local_keys(model: nn.Module) -> set[str]:
        return batchnorm_keys(model, statistics_only=True)
