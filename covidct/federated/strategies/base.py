"""What a covidct strategy adds to Flower's: which state stays at the site, and a round that fails loudly.

Flower's strategies skip a site whose reply is an error, or that did not reply in time, and aggregate the others;
a run record that silently averaged one hospital out would be wrong numbers, so a failed or missing reply stops
the run, naming the site.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from covidct.errors import TrainingIncomplete


class SiteStrategy:
    """Mixed in before a Flower strategy. `local_keys` names what never leaves a site; `draw` says which sites
    train in a round (covidct/federated/rounds.py: its round counts from the run's first); `rounds` collects what
    each site reported per round (loss, images, payload bytes) and `round_seconds` each round's time from its
    messages out to their aggregate, which the record keeps."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.rounds: list[dict[str, dict[str, float]]] = []
        self.round_seconds: list[float] = []
        self._started = 0.0
        self.sites: dict[int, str] = {}  # node id -> the site it named in its replies
        self.draw: Callable[[int], list[str]] | None = None  # set by the server before the first round
        self._bytes_sent = 0.0
        self._sampled: list[int] = []
        self._round = 0  # the round under way, counted from the run's first (Flower counts from its start's)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started = time.monotonic()
        self._round = int(config["first-round"]) + server_round
        self._bytes_sent = _payload(arrays)  # to each site sampled
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        drawn = self.draw(self._round)  # type: ignore[misc]
        messages = [message for message in messages if self.sites.get(message.metadata.dst_node_id) in drawn]
        absent = sorted(set(drawn) - {self.sites[message.metadata.dst_node_id] for message in messages})
        if absent:  # an aggregate without a drawn site, saved as a round, would leave it no checkpoint to go on from
            raise TrainingIncomplete(
                f"round {self._round}: no connected node is site {', '.join(absent)}, "
                "drawn to train in it (did its SuperNode reconnect under another name?); no record written: restart "
                "it and rerun the same command to resume from the last completed round."
            )
        self._sampled = [message.metadata.dst_node_id for message in messages]
        return messages

    @staticmethod
    def local_keys(model: nn.Module) -> set[str]:
        """The state-dict keys each site keeps to itself (FedAvg: none)."""
        return set()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        check_replies(f"round {self._round}", self._sampled, replies, self.sites)
        replies.sort(key=lambda reply: str(reply.content["site"]["name"]))  # sums in one order, however they came
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
        aggregate = self.aggregate_shared(server_round, replies)
        self.round_seconds.append(time.monotonic() - self._started)
        return aggregate

    def aggregate_shared(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


def _payload(arrays: ArrayRecord) -> float:
    """The bytes of a message's weights (their serialised arrays)."""
    return float(arrays.count_bytes()) if len(arrays) else 0.0


def check_replies(step: str, sampled: list[int], replies: list[Message], sites: dict[int, str]) -> None:
    """Every node sent a reply, none an error; `sites` learns which node is which site (for naming one that
    goes silent later)."""
    answered = {reply.metadata.src_node_id for reply in replies if not reply.has_error()}
    silent = [node for node in sampled if node not in answered]

    def named(nodes: list[int]) -> str:
        return ", ".join(f"site {sites[node]}" if node in sites else f"node {node}" for node in nodes)

    for reply in replies:
        if reply.has_error():
            reason = reply.error.reason.strip().rstrip(".")  # one sentence goes on after it
            if not reason.startswith("site "):  # Flower's own, for a node gone or crashed (it sends it, not the node)
                reason = f"{named(silent)}: {reason}"
            raise TrainingIncomplete(
                f"{step} failed: {reason}; no record written: rerun the same command to resume from the last "
                "completed round."
            )
        sites[reply.metadata.src_node_id] = str(reply.content["site"]["name"])
    if silent:
        raise TrainingIncomplete(
            f"{step}: no reply from {named(silent)} within federated.round_timeout_s (its SuperNode stopped, or lost "
            "the connection); no record written: restart it and rerun the same command to resume from the last "
            "completed round."
        )
