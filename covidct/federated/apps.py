"""The Flower apps of a federated run: the ServerApp runs the strategy's rounds and the final test, the
ClientApp is one site (covidct/federated/client.py). Flower carries the messages (and, in its Simulation
Runtime, runs one ClientApp per site); the server's state after every round is a file in the run folder, so a
killed run resumes from its last completed round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covidct.atomic import atomic_write
from covidct.checkpoints import read_checkpoint
from covidct.cli import user_message
from covidct.errors import CovidCTError, TrainingIncomplete
from covidct.federated.client import SiteClient
from covidct.federated.strategies.base import SiteStrategy, check_replies

log = logging.getLogger("covidct.run")
SERVER_STATE = "server.pt"  # in the run's federated/ folder: the round reached, the shared weights, the history
TEST_COLUMNS = ("site", "file", "label", "prob_covid", "patient")
SIMULATED_CPUS = 1  # each simulated site's CPUs (Ray's resources) and torch threads
CONFIG_KEY = "covidct-config"  # in a message's ConfigRecord: the run's config, as YAML


def simulated_site(cfg: DictConfig, folder: Path) -> Callable[[Message, Context], SiteClient]:
    """The Simulation Runtime's nodes: the site at the node's partition id in data.sites, its state under
    `folder`/clients/<site>/."""

    def site_client(message: Message, context: Context) -> SiteClient:
        site = str(list(cfg.data.sites)[int(context.node_config["partition-id"])])
        return SiteClient(cfg, site, folder / "clients" / site, threads=SIMULATED_CPUS)

    return site_client


def client_app(site_client: Callable[[Message, Context], SiteClient]) -> ClientApp:
    """One site per node; `site_client` says which site a node is, under which config, and where its state lies
    (in the Simulation Runtime: the run's config and folder, `simulated_site`; deployed: the node's own config,
    covidct/federated/deployment.py)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        def work() -> Message:
            site = site_client(message, context)
            config = message.content["config"]
            server_round = int(config["first-round"]) + int(config["server-round"])
            shared, metrics = site.train_round(
                server_round, message.content["arrays"].to_torch_state_dict(), float(config.get("proximal-mu", 0.0))
            )
            named = ConfigRecord({"name": site.site})
            content = {"arrays": _arrays(shared), "metrics": MetricRecord(metrics), "site": named}
            return Message(RecordDict(content), reply_to=message)

        return _replying(context, message, work)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        def work() -> Message:
            site = site_client(message, context)
            rows = site.test(int(message.content["config"]["round"]), message.content["arrays"].to_torch_state_dict())
            columns = ConfigRecord({column: [row[column] for row in rows] for column in TEST_COLUMNS})
            return Message(RecordDict({"rows": columns, "site": ConfigRecord({"name": site.site})}), reply_to=message)

        return _replying(context, message, work)

    return app


def _replying(context: Context, message: Message, work: Callable[[], Message]) -> Message:
    """`work`'s reply, or an error reply that names the node's site and says what went wrong in one line (the
    server stops the run with it); the traceback goes to the node's log (a SuperNode's, or Ray's session log)."""
    node = context.node_config
    site = node.get("site", f"#{node.get('partition-id', '?')}")
    try:
        return work()
    except CovidCTError as err:
        reason = user_message(err)
    except Exception as err:  # a bug, or a library's error: still one line at the server, the rest here
        log.exception("site %s failed", site)
        reason = f"{type(err).__name__}: {err}"
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"site {site}: {reason}")
    return Message(error, reply_to=message)


def _arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as Flower's record (an empty one: Local, which sends nothing)."""
    return ArrayRecord(dict(state)) if state else ArrayRecord()


def read_server_state(folder: Path) -> dict[str, Any] | None:
    """The server's state after its last completed round (None before the first), read without running code."""
    path = folder / SERVER_STATE
    return read_checkpoint(path) if path.is_file() else None


def _save_round(
    folder: Path, offset: int, total: int, strategy: SiteStrategy, server_round: int, arrays: ArrayRecord
) -> None:
    """evaluate_fn of Flower's loop, called after every round: the round's result, saved atomically."""
    if server_round == 0:
        return
    state = {"round": offset + server_round, "shared": arrays.to_torch_state_dict(), "rounds": strategy.rounds}
    atomic_write(folder / SERVER_STATE, partial(torch.save, state))
    log.info("federated round %d/%d done", offset + server_round, total)


def server_app(cfg: DictConfig, folder: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(cfg, folder, grid)

    return app


def serve(cfg: DictConfig, folder: Path, grid: Grid) -> None:
    """Run the rounds left (from the saved state in `folder`, if any), then have every site test the final model;
    the state file then holds the test rows too. Each message carries the run's config (`CONFIG_KEY`), which a
    deployed site checks before it uses any of it."""
    federated, sites = cfg.federated, list(cfg.data.sites)
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
    shipped = sent_config(cfg)
    wait_for_sites(grid, len(sites), float(federated.round_timeout_s))
    if offset < total:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=total - offset,
            timeout=float(federated.round_timeout_s),
            train_config=ConfigRecord({"first-round": offset, CONFIG_KEY: shipped}),
            evaluate_fn=partial(_save_round, folder, offset, total, strategy),
        )
        arrays = result.arrays  # the last round's aggregate (Local's: empty, as it started)
    if len(strategy.rounds) < total:
        raise TrainingIncomplete(f"federated training stopped after {len(strategy.rounds)} of {total} rounds.")
    nodes = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"round": total, CONFIG_KEY: shipped})}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=float(federated.round_timeout_s)))
    check_replies("the final test", nodes, replies, strategy.sites)
    tested = [str(reply.content["site"]["name"]) for reply in replies]
    if sorted(tested) != sorted(sites):
        raise TrainingIncomplete(f"the final test: the sites {tested} replied, but the run's sites are {sites}.")
    rows = []
    for reply in sorted(replies, key=lambda reply: str(reply.content["site"]["name"])):  # the sites' order
        columns = reply.content["rows"]
        rows += [dict(zip(TEST_COLUMNS, values)) for values in zip(*(columns[c] for c in TEST_COLUMNS))]
    final = read_server_state(folder) or saved
    atomic_write(folder / SERVER_STATE, partial(torch.save, {**final, "test_rows": rows}))


def wait_for_sites(grid: Grid, count: int, timeout_s: float) -> None:
    """Until `count` nodes are connected (Flower's sampling would wait for them for ever), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            connected = len(list(grid.get_node_ids()))
            raise TrainingIncomplete(
                f"{connected} of the run's {count} sites connected within federated.round_timeout_s={timeout_s:.0f}: "
                "start every site's SuperNode, then rerun."
            )
        time.sleep(1.0)


def sent_config(cfg: DictConfig) -> str:
    """The run's config as the sites receive it: resolved YAML, without where things lie on the server."""
    shipped = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in ("paths", "hydra", "logger")])
    return OmegaConf.to_yaml(shipped, resolve=True)
