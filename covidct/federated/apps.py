"""The Flower apps of a federated run: the ServerApp runs the strategy's rounds and the final test, the
ClientApp is one site (covidct/federated/client.py). Flower carries the messages (and, in its Simulation
Runtime, runs one ClientApp per site); the server's state after every round is a file in the run folder, so a
killed run resumes from its last completed round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig

from covidct.atomic import atomic_write
from covidct.checkpoints import read_checkpoint
from covidct.cli import user_message
from covidct.errors import CovidCTError, TrainingIncomplete
from covidct.federated.client import SiteClient

log = logging.getLogger("covidct.run")
SERVER_STATE = "server.pt"  # in the run's federated/ folder: the round reached, the shared weights, the history
TEST_COLUMNS = ("site", "file", "label", "prob_covid", "patient")


def site_of(cfg: DictConfig, context: Context) -> str:
    """The site a node trains: its node config's `site` (a deployment's SuperNode), else the site at its
    partition id in data.sites (the Simulation Runtime's numbering)."""
    if "site" in context.node_config:
        return str(context.node_config["site"])
    return str(list(cfg.data.sites)[int(context.node_config["partition-id"])])


def client_app(cfg: DictConfig, folder: Path) -> ClientApp:
    """One site per node, its state under `folder`/clients/<site>/."""
    app = ClientApp()

    def client(context: Context) -> SiteClient:
        site = site_of(cfg, context)
        return SiteClient(cfg, site, folder / "clients" / site)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        site = client(context)

        def work() -> Message:
            config = message.content["config"]
            server_round = int(config["first-round"]) + int(config["server-round"])
            shared, metrics = site.train_round(
                server_round, message.content["arrays"].to_torch_state_dict(), float(config.get("proximal-mu", 0.0))
            )
            named = ConfigRecord({"name": site.site})
            content = {"arrays": _arrays(shared), "metrics": MetricRecord(metrics), "site": named}
            return Message(RecordDict(content), reply_to=message)

        return _replying(site.site, message, work)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        site = client(context)

        def work() -> Message:
            rows = site.test(int(message.content["config"]["round"]), message.content["arrays"].to_torch_state_dict())
            columns = ConfigRecord({column: [row[column] for row in rows] for column in TEST_COLUMNS})
            return Message(RecordDict({"rows": columns, "site": ConfigRecord({"name": site.site})}), reply_to=message)

        return _replying(site.site, message, work)

    return app


def _replying(site: str, message: Message, work: Callable[[], Message]) -> Message:
    """`work`'s reply, or an error reply that names the site and says what went wrong in one line (the server
    stops the run with it); the traceback stays in the site's own log."""
    try:
        return work()
    except CovidCTError as err:
        reason = user_message(err)
    except Exception as err:  # a bug, or a library's error: still one line at the server, the rest here
        log.exception("site %s failed", site)
        reason = f"{type(err).__name__}: {err}"
    return Message(Error(code=0, reason=f"site {site}: {reason}"), reply_to=message)


def _arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(dict(state)) if state else ArrayRecord()


def read_server_state(folder: Path) -> dict[str, Any] | None:
    path = folder / SERVER_STATE
    return read_checkpoint(path) if path.is_file() else None


def _save_round(folder: Path, offset: int, total: int, strategy: Any, server_round: int, arrays: ArrayRecord) -> None:
    """evaluate_fn of Flower's loop, called after every round: the round's result, saved atomically."""
    if server_round == 0:
        return
    state = {"round": offset + server_round, "shared": arrays.to_torch_state_dict(), "rounds": strategy.rounds}
    atomic_write(folder / SERVER_STATE, partial(torch.save, state))
    log.info("federated round %d/%d done", offset + server_round, total)


def server_app(cfg: DictConfig, folder: Path) -> ServerApp:
    """Runs the rounds left (from the saved state, if any), then has every site test the final model; the
    state file then holds the test rows too."""
    app = ServerApp()
    sites = list(cfg.data.sites)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federated = cfg.federated
        saved = read_server_state(folder)
        if saved is None:
            starter = SiteClient(cfg, sites[0], folder / "clients" / sites[0])
            saved = {"round": 0, "shared": starter.shared_part(starter.model()), "rounds": []}
        strategy = instantiate(
            federated.strategy,
            fraction_train=float(federated.fraction_fit),
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=len(sites),
        )
        strategy.rounds = list(saved["rounds"])
        offset, total = int(saved["round"]), int(federated.rounds)
        arrays = _arrays(saved["shared"])
        if offset < total:
            result = strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=total - offset,
                timeout=float(federated.round_timeout_s),
                train_config=ConfigRecord({"first-round": offset}),
                evaluate_fn=partial(_save_round, folder, offset, total, strategy),
            )
            arrays = result.arrays if len(result.arrays) or not len(arrays) else arrays
        if len(strategy.rounds) < total:
            raise TrainingIncomplete(f"federated training stopped after {len(strategy.rounds)} of {total} rounds.")
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({"round": total})}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for node in grid.get_node_ids()
        ]
        rows = []
        for reply in grid.send_and_receive(messages, timeout=float(federated.round_timeout_s)):
            if reply.has_error():
                raise TrainingIncomplete(f"the final test failed: {reply.error.reason.strip()}.")
            columns = reply.content["rows"]
            rows += [dict(zip(TEST_COLUMNS, values)) for values in zip(*(columns[c] for c in TEST_COLUMNS))]
        final = read_server_state(folder) or saved
        atomic_write(folder / SERVER_STATE, partial(torch.save, {**final, "test_rows": rows}))

    return app
