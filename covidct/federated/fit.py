"""Train and test one federated configuration into its run folder: what `python -m covidct.run` does for an
experiment with a `federated` node (fedavg, fedprox, fedbn, silobn, local), in order: check the config, lock and
claim the folder, run the rounds through Flower (resuming the last completed one), have every site test its
final model, write the run record in the centralised runs' format, plus what federation adds."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from covidct.errors import ConfigError, TrainingIncomplete
from covidct.federated import apps
from covidct.federated.rounds import federation_sites, never_drawn, rounds_trained
from covidct.metrics import recomputed_test
from covidct.pseudonyms import Pseudonyms
from covidct.records import write_run_record
from covidct.resolvers import recorded_config
from covidct.run_folder import run_dir_lock
from covidct.training.fit import claim_folder, data_record, log_test, recorded_run

log = logging.getLogger("covidct.run")
RUNTIMES = ("simulation", "deployment")
FOLDER = "federated"  # in a run folder: the server's state, and clients/<site>/ in the Simulation Runtime


def check_federated(cfg: DictConfig) -> None:
    """What a federated run needs beyond a centralised one's options."""
    trained, _ = federation_sites(cfg)
    if len(trained) < 2:
        raise ConfigError(
            f"a federated run needs at least two sites to train on (data.sites without data.test_sites), got {trained}."
        )
    if not 0.0 < float(cfg.federated.fraction_fit) <= 1.0:
        raise ConfigError(
            f"federated.fraction_fit={cfg.federated.fraction_fit}: the fraction of the sites that train in a round is "
            "a number in (0, 1] (at least one site trains)."
        )
    untrained = never_drawn(cfg)
    if untrained:
        raise ConfigError(
            f"federated.fraction_fit={cfg.federated.fraction_fit} at seed {cfg.seed} draws site "
            f"{', '.join(untrained)} in none of the {cfg.federated.rounds} rounds: it would test an untrained network. "
            "Raise federated.fraction_fit or federated.rounds, or choose another seed."
        )
    if float(cfg.data.val_fraction) > 0:
        raise ConfigError("data.val_fraction > 0: a federated run tests its last round only; set data.val_fraction=0.")
    runtime = cfg.federated.runtime
    if runtime not in RUNTIMES:
        raise ConfigError(f"federated.runtime={runtime}: choose one of {', '.join(RUNTIMES)}.")
    if runtime == "deployment" and not cfg.federated.get("superlink"):
        raise ConfigError("federated.runtime=deployment needs federated.superlink=HOST:PORT (the SuperLink's).")


def train_federated(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the federation, test, write the record; returns its "test" part. A folder with a complete record is
    skipped; an interrupted run resumes from its last completed round."""
    check_federated(cfg)
    output_dir = Path(output_dir)
    with run_dir_lock(output_dir, wait=bool(cfg.get("wait_for_run_folder"))):
        deployed = cfg.federated.runtime == "deployment"  # the data lie at the sites, each reports its own
        datamodule, fingerprint, state = claim_folder(cfg, output_dir, read_data=not deployed)
        if state.record is not None:
            return state.record["test"]
        folder = output_dir / FOLDER
        resumed = apps.read_server_state(folder)
        if resumed is not None:
            log.info("resuming the federation from round %d of %d", resumed["round"], cfg.federated.rounds)
        start = time.monotonic()
        if deployed:  # each hospital reads its own site files
            from covidct.federated.deployment import run_on_superlink

            run_on_superlink(cfg, folder, float(cfg.federated.round_timeout_s) * (int(cfg.federated.rounds) + 1))
        else:
            _simulate(with_site_specs(cfg, datamodule), folder)
        wall_s = time.monotonic() - start
        saved = apps.read_server_state(folder)
        if saved is None or "test_rows" not in saved:
            raise TrainingIncomplete(
                f"the federation ended without its final test: no record written; rerun the same command to resume "
                f"from {folder / apps.SERVER_STATE}."
            )
        rows = [{"selection": "last", **row} for row in saved["test_rows"]]
        epochs = int(cfg.federated.rounds) * int(cfg.federated.local_epochs)  # the schedule's: the federation's
        trained, _ = federation_sites(cfg)
        site_epochs = {  # each site's own: below the federation's where fraction_fit < 1 left it rounds out
            site: len(rounds_trained(cfg, site, int(cfg.federated.rounds) + 1)) * int(cfg.federated.local_epochs)
            for site in trained
        }
        choices = {"last": {"checkpoint": f"{FOLDER}/{apps.SERVER_STATE}", "epoch": epochs - 1}}
        test = recomputed_test(choices, rows, "mean")
        pseudonyms = Pseudonyms(cfg.patient_ids, cfg.pseudonym_key)
        data = sites_data(cfg, saved["sites"]) if deployed else data_record(datamodule, fingerprint)
        run = (
            recorded_run(cfg, data, pseudonyms, list(test))
            | (sites_naming(cfg, saved["sites"]) if deployed else {})
            | {
                "epochs_trained": epochs,
                "device": "cpu" if cfg.federated.runtime == "simulation" else "at each site",  # simulated sites: 1 CPU
                "federated": {
                    **OmegaConf.to_container(cfg.federated, resolve=True),
                    "rounds_completed": int(saved["round"]),
                    "site_epochs": site_epochs,
                    "per_round": saved["rounds"],
                    "round_seconds": saved.get("round_seconds", []),  # each round's, resumed or not: training time
                    "wall_s": wall_s if resumed is None else None,  # the whole, start-up and test included; a resumed
                    # run's is in pieces
                },
            }
        )
        path = write_run_record(output_dir, test, rows, run, recorded_config(cfg))
        log.info("run record: %s", path)
        log_test(test)
        return test


def _reporting(cfg: DictConfig, reports: dict[str, Any]) -> list[str]:
    """The sites that reported, in the run's order: those that train, then those that only test."""
    trained, unseen = federation_sites(cfg)
    return [site for site in (*trained, *unseen) if site in reports]


def sites_data(cfg: DictConfig, reports: dict[str, Any]) -> dict[str, Any]:
    """The record's data block (training.fit.data_record's) of a deployed federation, from what each site
    reported of its own data (SiteClient.report): its parts, notes, fingerprint and site file."""
    order = _reporting(cfg, reports)
    first = reports[order[0]]["splits"]
    splits = {key: value for key, value in first.items() if key not in ("sites", "notes", "test_sites")}
    splits["sites"] = {site: reports[site]["splits"]["sites"][site] for site in order}
    notes = [note for site in order for note in reports[site]["splits"].get("notes", [])]
    splits["notes"] = list(dict.fromkeys(notes))
    held = [site for site in order if site in reports[site]["splits"].get("test_sites", [])]
    if held:
        splits["test_sites"] = held
    return {
        "splits": splits,
        "data_fingerprint": {site: reports[site]["fingerprint"][site] for site in order},
        "data_root": "at each site",
        "sites": {site: reports[site]["spec"] for site in order},
    }


def sites_naming(cfg: DictConfig, reports: dict[str, Any]) -> dict[str, Any]:
    """How a deployed federation's rows name patients: each site's own choice and key (node config), one value
    where the sites agree, else each site's."""
    order = _reporting(cfg, reports)
    naming = {}
    for key in ("patient_ids", "pseudonym_key_id"):
        values = {site: reports[site].get(key) for site in order}
        agreed = set(values.values())
        naming[key] = (
            agreed.pop() if len(agreed) == 1 else ", ".join(f"{site}: {value}" for site, value in values.items())
        )
    return naming


def with_site_specs(cfg: DictConfig, datamodule: Any) -> DictConfig:
    """`cfg` with its sites named and specified (data.site_specs) as this process found them: a simulated site
    runs in a process of Ray's, where site files found through hydra.searchpath are not found again."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.site_specs = {name: spec.as_dict() for name, spec in datamodule.specs.items()}
        cfg.data.sites, cfg.data.test_sites = list(datamodule.sites), list(datamodule.unseen_sites)
    return cfg


def quiet_flower() -> None:
    """Flower logs every step of its loop twice (its own console handler, then Hydra's) and its database layer
    (alembic) its plug-ins; the run logs each round itself, and a failed site ends it with its own error."""
    for name in ("flwr", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def _simulate(cfg: DictConfig, folder: Path) -> None:
    """Flower's Simulation Runtime on this machine: one ClientApp per site, one CPU each."""
    quiet_flower()
    from flwr.simulation import run_simulation

    ray = {  # Ray on the loopback address only, no dashboard; the sites' Lightning chatter stays in Ray's logs
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": "ERROR",
    }
    run_simulation(
        server_app=apps.server_app(cfg, folder),
        client_app=apps.client_app(apps.simulated_site(cfg, folder)),
        num_supernodes=sum(map(len, federation_sites(cfg))),  # a site that only tests is a node too
        backend_config={"client_resources": {"num_cpus": apps.SIMULATED_CPUS, "num_gpus": 0.0}, "init_args": ray},
    )
