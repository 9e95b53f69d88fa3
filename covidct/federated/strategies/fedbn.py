"""FedBN (Li et al., ICLR 2021): every BatchNorm stays at its site, affine parameters and running statistics
alike; the rest is FedAvg. The federated twin of SepNorm (domain-specific BN)."""

from __future__ import annotations

from torch import nn

from covidct.federated.sharing import batchnorm_keys
from covidct.federated.strategies.fedavg import FedAvg


class FedBN(FedAvg):
    @staticmethod
    def local_keys(model: nn.Module) -> set[str]:
        return batchnorm_keys(model)
