"""Flower's Deployment Runtime: the covidct Flower App (`server`, `client`) that a SuperLink and one SuperNode per
hospital run, and what covidct.run does to start a run on a SuperLink (`run_on_superlink`).

A hospital's SuperNode runs `client` with its own node config (`--node-config "site='A' data-root='/data'
state-dir='/var/covidct'"`): which site it is, where its images lie, where its state stays, and optionally
`patient-ids` and `pseudonym-key`. The run's config arrives from the server with every message; the site checks
it before it uses any of it: every `_target_` it would build must be one of covidct's methods, models,
DataModule or strategies, torch's optimizers and schedulers or Lightning's Trainer (anything else could run any
code at the hospital), and where things lie, which site it is and how patients are named are its own, never the
server's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf, open_dict

from covidct.atomic import atomic_write_text
from covidct.cli import user_message
from covidct.errors import ConfigError, CovidCTError, DataError, TrainingIncomplete
from covidct.federated.apps import CONFIG_KEY, client_app, sent_config, serve
from covidct.federated.client import SiteClient

SERVER_CONFIG = "config.yaml"  # in a run's federated/ folder: the config the ServerApp runs
FAILURE = "failure.txt"  # beside it: why the ServerApp stopped, in one line
RUN_FOLDER_KEY = "run-folder"  # the Flower App's run config: where the ServerApp finds that config
ALLOWED_TARGETS = (
    "covidct.methods.",
    "covidct.models.",
    "covidct.federated.strategies.",
    "covidct.data.SiteDataModule",
    "covidct.data.TwoSiteDataModule",
    "torch.optim.",
    "pytorch_lightning.Trainer",
)
APP_PYPROJECT = """\
# The covidct Flower App (written by covidct.run for `flwr run`): its components live in the installed covidct.
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "covidct-federation"
version = "1.0.0"
description = "covidct's federated training: one SuperNode per hospital"
license = "MIT"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "covidct"

[tool.flwr.app.components]
serverapp = "covidct.federated.deployment:server"
clientapp = "covidct.federated.deployment:client"

[tool.flwr.app.config]
{key} = ""
"""

server = ServerApp()


@server.main()
def _serve(grid: Grid, context: Context) -> None:
    """The ServerApp runs in a process of the SuperLink's: a failure is written beside the run for covidct.run,
    which reports it in one line."""
    folder = Path(str(context.run_config[RUN_FOLDER_KEY]))
    (folder / FAILURE).unlink(missing_ok=True)
    try:
        serve(OmegaConf.load(folder / SERVER_CONFIG), folder, grid)
    except Exception as err:
        atomic_write_text(folder / FAILURE, user_message(err) if isinstance(err, CovidCTError) else repr(err))
        raise


def checked_targets(node: Any, where: str = "") -> None:
    """Refuse a config that would build anything but the allowed classes (ALLOWED_TARGETS)."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise ConfigError(
                f"the server's config asks this site to build {target!r} ({where or 'top'}._target_), which is none "
                "of covidct's methods, models, data or strategies, torch's optimizers or Lightning's Trainer: refused."
            )
        for key, value in node.items():
            checked_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            checked_targets(value, f"{where}[{index}]")


def site_config(text: str, node: Any) -> DictConfig:
    """The run's config as the server sent it (`text`), checked, with this node's own site, data root, cache and
    patient naming in place of the server's."""
    cfg = OmegaConf.create(text)  # YAML through OmegaConf's safe loader: data, never objects
    if not isinstance(cfg, DictConfig):
        raise ConfigError("the server sent no config mapping.")
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("callbacks", None)  # a site builds none of the server's callbacks
    checked_targets(plain)
    site, data = str(node["site"]), plain.get("data", {})
    listed = [*data.get("sites", []), *(data.get("test_sites") or [])]
    if site not in listed:
        raise ConfigError(f"this node is site {site}, which the server's run neither trains nor tests ({listed}).")
    cfg = OmegaConf.create(plain)
    with open_dict(cfg):
        cfg.data.root = str(node["data-root"])
        cfg.data.cache_dir = str(node["cache-dir"]) if "cache-dir" in node else None
        cfg.data.site_specs = None  # the hospital's own site files (conf/data/site/), never the server's paths
        cfg.data.allow_outside_root = False
        cfg.patient_ids = str(node.get("patient-ids", "pseudonym"))
        cfg.pseudonym_key = str(node["pseudonym-key"]) if "pseudonym-key" in node else None
    return cfg


def _deployed_site(message: Message, context: Context) -> SiteClient:
    node = context.node_config
    missing = [key for key in ("site", "data-root", "state-dir") if key not in node]
    if missing:
        example = "site='A' data-root='/data' state-dir='/var/covidct'"
        raise ConfigError(f'this SuperNode\'s --node-config lacks {", ".join(missing)} (e.g. "{example}").')
    cfg = site_config(str(message.content["config"][CONFIG_KEY]), node)
    threads = int(node["threads"]) if "threads" in node else None  # torch's CPU threads (default: torch's choice)
    return SiteClient(cfg, str(node["site"]), Path(str(node["state-dir"])) / str(node["site"]), threads)


client = client_app(_deployed_site)


def run_on_superlink(cfg: DictConfig, folder: Path, timeout_s: float) -> None:
    """Submit the run to the SuperLink of `federated.superlink` with `flwr run` and wait for it; its ServerApp
    (a process the SuperLink starts on its machine) reads `folder`. TLS unless `federated.root_certificates` is
    null (then insecure, which the SuperLink must allow)."""
    federated = cfg.federated
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SERVER_CONFIG, sent_config(cfg))
    app = folder / "app"
    atomic_write_text(app / "pyproject.toml", APP_PYPROJECT.format(key=RUN_FOLDER_KEY))
    certificates = federated.get("root_certificates")
    connection = [f'address = "{federated.superlink}"']
    connection.append(f'root-certificates = "{Path(certificates).absolute()}"' if certificates else "insecure = true")
    home = folder / "flwr-home"
    atomic_write_text(
        home / "config.toml", '[superlink]\ndefault = "covidct"\n\n[superlink.covidct]\n' + "\n".join(connection) + "\n"
    )
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(app),
        "covidct",
        "--run-config",
        f'{RUN_FOLDER_KEY}="{folder.absolute()}"',
        "--stream",
    ]
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TrainingIncomplete(
            f"the run on the SuperLink {federated.superlink} did not end within {timeout_s:.0f} s; rerun to resume."
        ) from None
    if (folder / FAILURE).is_file():
        raise TrainingIncomplete((folder / FAILURE).read_text().strip())
    if done.returncode != 0:
        lines = [line.strip("│ ") for line in (done.stdout + done.stderr).splitlines() if line.strip("│╭╰─ ")]
        raise DataError(f"flwr run on {federated.superlink} failed: {lines[-1] if lines else done.returncode}")
