"""What a covidct strategy adds to Flower's: which state stays at the site, and a round that fails loudly.

Flower's strategies skip a site whose reply is an error and aggregate the others; a run record that silently
averaged one hospital out would be wrong numbers, so a failed reply stops the run, naming the site.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from covidct.errors import TrainingIncomplete


class SiteStrategy:
    """Mixed in before a Flower strategy. `local_keys` names what never leaves a site; `rounds` collects what
    each site reported per round (loss, images, payload bytes), which the record keeps."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.rounds: list[dict[str, dict[str, float]]] = []
        self._bytes_sent = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._bytes_sent = _payload(arrays)  # to each site sampled
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def local_keys(self, model: nn.Module) -> set[str]:
        """The state-dict keys each site keeps to itself (FedAvg: none)."""
        return set()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [reply for reply in replies if reply.has_error()]
        if failed:
            reply = failed[0]
            raise TrainingIncomplete(
                f"round {server_round} failed: {reply.error.reason.strip()}; no record written: rerun the same "
                "command to resume from the last completed round."
            )
        self.rounds.append(
            {
                str(reply.content["site"]["name"]): {
                    **dict(reply.content["metrics"]),
                    "bytes_sent": self._bytes_sent,
                    "bytes_received": _payload(reply.content["arrays"]),
                }
                for reply in replies
            }
        )
        return self.aggregate_shared(server_round, replies)

    def aggregate_shared(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


def _payload(arrays: ArrayRecord) -> float:
    """The bytes of a message's weights (their serialised arrays)."""
    return float(arrays.count_bytes()) if len(arrays) else 0.0
