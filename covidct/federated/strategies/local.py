"""Local: each site trains alone, nothing leaves it (the baseline federation must beat); the same rounds and
records as the others, zero bytes sent."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from covidct.federated.strategies.fedavg import FedAvg


class Local(FedAvg):
    @staticmethod
    def local_keys(model: nn.Module) -> set[str]:
        return set(model.state_dict())

    def aggregate_shared(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return ArrayRecord(), None
