"""The Flower apps of a federated run: the ServerApp runs the strategy's rounds and the final test, the
ClientApp is one site (covidct/federated/client.py). Flower carries the messages (and, in its Simulation
Runtime, runs one ClientApp per site); the server's state after every round is a file in the run folder, so a
killed run resumes from its last completed round.
"""

from __future__ import annotations

import json
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
from covidct.errors import CovidCTError, DataError, TrainingIncomplete
from covidct.federated.client import SiteClient
from covidct.federated.rounds import federation_sites, sampled_sites
from covidct.federated.strategies.base import SiteStrategy, check_replies
from covidct.records import UNSEEN_COLUMN
from covidct.run_folder import fingerprint_change

log = logging.getLogger("covidct.run")
SERVER_STATE = "server.pt"  # in the run's federated/ folder: the round reached, the shared weights, the history
TEST_COLUMNS = ("site", "file", "label", "prob_covid", "patient")
SIMULATED_CPUS = 1  # each simulated site's CPUs (Ray's resources) and torch threads
CONFIG_KEY = "covidct-config"  # in a message's ConfigRecord: the run's config, as YAML
KEPT_KEY = "kept"  # a trained site's final test reply: what it kept to itself (asked for when some site only tests)
TRAINED_KEY = "trained-sites"  # the final test of a site that only tests: the sites whose weights it is sent


def simulated_site(cfg: DictConfig, folder: Path) -> Callable[[Message, Context], SiteClient]:
    """The Simulation Runtime's nodes: the site at the node's partition id in data.sites, its state under
    `folder`/clients/<site>/."""

    trained, unseen = federation_sites(cfg)

    def site_client(message: Message, context: Context) -> SiteClient:
        site = [*trained, *unseen][int(context.node_config["partition-id"])]
        return SiteClient(cfg, site, folder / "clients" / site, threads=SIMULATED_CPUS)

    return site_client


def client_app(site_client: Callable[[Message, Context], SiteClient]) -> ClientApp:
    """One site per node; `site_client` says which site a node is, under which config, and where its state lies
    (in the Simulation Runtime: the run's config and folder, `simulated_site`; deployed: the node's own config,
    covidct/federated/deployment.py)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        def work(site: SiteClient) -> Message:
            config = message.content["config"]
            server_round = int(config["first-round"]) + int(config["server-round"])
            shared, metrics = site.train_round(
                server_round, message.content["arrays"].to_torch_state_dict(), float(config.get("proximal-mu", 0.0))
            )
            named = ConfigRecord({"name": site.site})
            content = {"arrays": _arrays(shared), "metrics": MetricRecord(metrics), "site": named}
            return Message(RecordDict(content), reply_to=message)

        return _replying(context, message, site_client, work)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        def work(site: SiteClient) -> Message:  # which site this node is, and what it holds of its own data
            report = ConfigRecord({"json": json.dumps(site.report())})
            return Message(RecordDict({"site": _named(site), "report": report}), reply_to=message)

        return _replying(context, message, site_client, work)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        def work(site: SiteClient) -> Message:
            config = message.content["config"]
            shared = message.content["arrays"].to_torch_state_dict()
            content: dict[str, Any] = {"site": _named(site)}
            if TRAINED_KEY in config:  # a site that never trained: the trained sites' final weights
                trained = [str(name) for name in config[TRAINED_KEY]]
                kept = {name: message.content[f"{KEPT_KEY}-{name}"].to_torch_state_dict() for name in trained}
                rows, columns = site.test_unseen(trained, shared, kept), (*TEST_COLUMNS, UNSEEN_COLUMN)
            else:
                rows, columns = site.test(int(config["round"]), shared), TEST_COLUMNS
                if config.get(KEPT_KEY):
                    content[KEPT_KEY] = _arrays(site.kept_part(int(config["round"])))
            content["rows"] = ConfigRecord({column: [row[column] for row in rows] for column in columns})
            return Message(RecordDict(content), reply_to=message)

        return _replying(context, message, site_client, work)

    return app


def _named(site: SiteClient) -> ConfigRecord:
    return ConfigRecord({"name": site.site})


def _replying(
    context: Context,
    message: Message,
    site_client: Callable[[Message, Context], SiteClient],
    work: Callable[[SiteClient], Message],
) -> Message:
    """`work`'s reply for the node's site, or an error reply that names the site and says what went wrong in one
    line (the server stops the run with it); the traceback goes to the node's log (a SuperNode's, or Ray's session
    log). A node that cannot say which site it is (its config unreadable) is named by its Flower node config."""
    node = context.node_config
    site = node.get("site", f"#{node.get('partition-id', '?')}")
    try:
        client = site_client(message, context)
        site = client.site
        return work(client)
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
    folder: Path,
    offset: int,
    total: int,
    strategy: SiteStrategy,
    reports: dict[str, Any],
    server_round: int,
    arrays: ArrayRecord,
) -> None:
    """evaluate_fn of Flower's loop, called after every round: the round's result, saved atomically."""
    if server_round == 0:
        return
    state = {
        "round": offset + server_round,
        "shared": arrays.to_torch_state_dict(),
        "rounds": strategy.rounds,
        "round_seconds": strategy.round_seconds,
        "sites": reports,
    }
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
    federated, (sites, unseen) = cfg.federated, federation_sites(cfg)
    saved = read_server_state(folder)
    if saved is None:
        starter = SiteClient(cfg, sites[0], folder / "clients" / sites[0])
        saved = {"round": 0, "shared": starter.shared_part(starter.model()), "rounds": [], "round_seconds": []}
    strategy = instantiate(  # Flower sends every node a round; the strategy keeps the round's draw of sites
        federated.strategy,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=len(sites) + len(unseen),
    )
    strategy.draw = partial(sampled_sites, sites, float(federated.fraction_fit), int(cfg.seed))
    strategy.rounds = list(saved["rounds"])
    strategy.round_seconds = list(saved.get("round_seconds", [None] * len(saved["rounds"])))  # unknown: not kept
    offset, total = int(saved["round"]), int(federated.rounds)
    arrays = _arrays(saved["shared"])
    shipped = sent_config(cfg)
    timeout = float(federated.round_timeout_s)
    wait_for_sites(grid, len(sites) + len(unseen), timeout)
    named, reports = identified_sites(grid, shipped, timeout, strategy.sites)
    check_same_data(saved.get("sites"), reports, folder)
    saved["sites"] = reports
    if offset < total:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=total - offset,
            timeout=float(federated.round_timeout_s),
            train_config=ConfigRecord({"first-round": offset, CONFIG_KEY: shipped}),
            evaluate_fn=partial(_save_round, folder, offset, total, strategy, reports),
        )
        arrays = result.arrays  # the last round's aggregate (Local's: empty, as it started)
    if len(strategy.rounds) < total:
        raise TrainingIncomplete(f"federated training stopped after {len(strategy.rounds)} of {total} rounds.")
    nodes = [node for node, site in named.items() if site in sites]  # every training site, in a round or not
    config = {"round": total, CONFIG_KEY: shipped, KEPT_KEY: bool(unseen)}
    replies = _tested(grid, "the final test", nodes, {"arrays": arrays}, config, timeout, strategy.sites, sites)
    rows = _rows(replies)
    if unseen:  # the sites that never trained: the final weights, with what each trained site kept
        kept = {f"{KEPT_KEY}-{reply.content['site']['name']}": reply.content[KEPT_KEY] for reply in replies}
        others = [node for node, site in named.items() if site in unseen]  # as they named themselves at the start
        config = {CONFIG_KEY: shipped, TRAINED_KEY: sorted(sites)}
        step = "the test of the sites that never trained"
        rows += _rows(_tested(grid, step, others, {"arrays": arrays, **kept}, config, timeout, strategy.sites, unseen))
    final = read_server_state(folder) or saved
    atomic_write(folder / SERVER_STATE, partial(torch.save, {**final, "sites": reports, "test_rows": rows}))


def _tested(
    grid: Grid,
    step: str,
    nodes: list[int],
    records: dict[str, ArrayRecord],
    config: dict[str, Any],
    timeout: float,
    names: dict[int, str],
    expected: list[str],
) -> list[Message]:
    """Every one of `nodes` sent a test message; their replies, in the sites' order, one from each `expected` site."""
    messages = [
        Message(
            RecordDict({**records, "config": ConfigRecord(config)}), message_type=MessageType.EVALUATE, dst_node_id=node
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    check_replies(step, nodes, replies, names)
    tested = sorted(str(reply.content["site"]["name"]) for reply in replies)
    if tested != sorted(expected):
        raise TrainingIncomplete(f"{step}: the sites {tested} replied, but the run's are {sorted(expected)}.")
    return sorted(replies, key=lambda reply: str(reply.content["site"]["name"]))


def _rows(replies: list[Message]) -> list[dict[str, Any]]:
    """The prediction rows of the sites' test replies, in their order."""
    rows = []
    for reply in replies:
        columns = reply.content["rows"]
        rows += [dict(zip(columns, values)) for values in zip(*columns.values())]
    return rows


def identified_sites(
    grid: Grid, shipped: str, timeout: float, names: dict[int, str]
) -> tuple[dict[int, str], dict[str, Any]]:
    """Which site each connected node is, and what each reports of its data (SiteClient.report), by site."""
    nodes = list(grid.get_node_ids())
    config = ConfigRecord({CONFIG_KEY: shipped})
    messages = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    check_replies("asking the sites who they are", nodes, replies, names)
    named = {reply.metadata.src_node_id: str(reply.content["site"]["name"]) for reply in replies}
    twice = sorted({site for site in named.values() if list(named.values()).count(site) > 1})
    if twice:
        raise TrainingIncomplete(
            f"two nodes say they are site {', '.join(twice)}: give each SuperNode its own site in its --node-config."
        )
    reports = {named[reply.metadata.src_node_id]: json.loads(str(reply.content["report"]["json"])) for reply in replies}
    return named, reports


def check_same_data(before: dict[str, Any] | None, now: dict[str, Any], folder: Path) -> None:
    """A resumed federation's sites hold the data they began with (each site's fingerprint of its parts)."""
    for site, report in now.items():
        change = before and site in before and fingerprint_change(before[site]["fingerprint"], report["fingerprint"])
        if change:
            raise DataError(
                f"site {site}'s data changed since this federated run began ({change}): resuming would mix folds. "
                f"Restore that site's data, or delete {folder.parent} to start again."
            )


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
