"""Train and test one configuration into its run folder: what `python -m covidct.run` (a thin Hydra entry point)
does for each job, in order: check the config, lock and claim the folder, fit (resuming its last checkpoint),
test every selection, write the run record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covidct.atomic import atomic_write
from covidct.checkpoints import check_checkpoint, read_checkpoint, resume_point
from covidct.config_checks import check_config
from covidct.data.sources import patient_folders
from covidct.errors import ConfigError, CovidCTError, DataError, TrainingIncomplete
from covidct.metrics import recomputed_test
from covidct.pseudonyms import Pseudonyms
from covidct.records import METRICS_FILE, git_commit, write_run_record
from covidct.report.curves import roc_curve
from covidct.resolvers import recorded_config  # also registers the config's interpolations
from covidct.run_folder import LAST_CHECKPOINT, RunState, prepare_run_dir, run_dir_lock, run_settings
from covidct.scoring import unseen_site_rows

log = logging.getLogger("covidct.run")  # the name users filter on, as for every job's log


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, letting our own errors through unwrapped so they print as one clear line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, CovidCTError):
            raise err.__cause__ from None
        raise


def _logger(cfg: DictConfig, output_dir: Path) -> Any:
    if cfg.get("logger") is None:
        return False
    logger = instantiate(cfg.logger, save_dir=str(output_dir))
    logger.log_hyperparams(recorded_config(cfg))  # W&B may send them: environment reads stay as written
    return logger


def _device_name(trainer: pl.Trainer) -> str:
    root = trainer.strategy.root_device
    return torch.cuda.get_device_name(root) if root.type == "cuda" else root.type


def _finish_logger(logger: Any, test: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """W&B: final test metrics of every selection into the run summary, a ROC curve per site (last epoch),
    and close the run so the next job of a sweep gets its own."""
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    experiment = logger.experiment
    for selection, result in test.items():
        for level in ("images", "patients"):
            for site, values in result[level].items():
                for name, value in values.items():
                    experiment.summary[f"final/{selection}/{level}/{site}/{name}"] = value
            for how, unseen in result.get("unseen", {}).items():
                for site, values in unseen[level].items():
                    for name, value in values.items():
                        experiment.summary[f"final/{selection}/{level}/{site}@{how}/{name}"] = value
    for site in test["last"]["images"]:
        rows = [p for p in predictions if p["site"] == site and p["selection"] == "last"]
        fpr, tpr, auc = roc_curve([p["label"] for p in rows], [p["prob_covid"] for p in rows])
        table = wandb.Table(columns=["fpr", "tpr"], data=[[f, t] for f, t in zip(fpr, tpr)])
        roc = wandb.plot.line(table, "fpr", "tpr", title=f"ROC, site {site} (AUC {100 * auc:.1f})")
        experiment.log({f"test/{site}/roc": roc})
    experiment.finish()


def drop_optimizer_state(folder: Path) -> None:
    """A finished run is never resumed: keep the weights, drop the Adam state (two thirds of each file)."""
    for path in folder.glob("*.ckpt"):
        try:
            checkpoint = read_checkpoint(path)
        except DataError as err:  # not ours (e.g. a file that would run code): left as it is, never loaded
            log.warning("%s", err)
            continue
        checkpoint.pop("optimizer_states", None)
        checkpoint.pop("lr_schedulers", None)
        try:
            atomic_write(path, partial(torch.save, checkpoint))
        except OSError as err:  # the record is complete; the whole checkpoint stays, a valid (larger) file
            log.warning("cannot rewrite %s without its optimizer state (%s): kept whole", path, err.strerror or err)


def make_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """The configured Trainer; precision 'auto' means bf16 autocast on a GPU that has it, else fp32."""
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return instantiate(cfg.trainer, precision=precision, **kwargs)


def _callbacks(cfg: DictConfig, output_dir: Path, validation: bool, logger: Any) -> dict[str, pl.Callback]:
    """The configured callbacks (conf/callbacks/), checkpoints in the run's folder; the best-validation
    checkpoint only for a run with a validation part, the learning-rate monitor only with a logger, the
    progress bar only where the trainer shows one."""
    unused = {
        "best_checkpoint": not validation,
        "lr_monitor": not logger,
        "progress_bar": not cfg.trainer.get("enable_progress_bar", True),
    }
    callbacks = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or unused.get(name):
            continue
        extra = {"dirpath": output_dir / "checkpoints"} if name.endswith("checkpoint") else {}
        callbacks[name] = build(node, **extra)
    if "last_checkpoint" not in callbacks:
        raise ConfigError("callbacks.last_checkpoint is needed: it is what an interrupted run resumes from.")
    return callbacks


def _test_selections(
    trainer: pl.Trainer, model: Any, datamodule: Any, best: pl.Callback | None, output_dir: Path
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Test every checkpoint a report may select: the last epoch and, with a validation part, the best
    validation AUC. Which one a table shows is chosen at report time (`--select`), not here. Patient-level
    results pool a patient's slices by their mean probability (the report can re-pool by max)."""
    choices: dict[str, dict[str, Any]] = {"last": {"checkpoint": None, "epoch": trainer.current_epoch - 1}}
    if best is not None and best.best_model_path:
        path = best.best_model_path
        epoch = int(read_checkpoint(path)["epoch"])
        choices["best_val_auc"] = {"checkpoint": path, "epoch": epoch, "val_auc": float(best.best_model_score)}
    patients = datamodule.test_patients()
    predictions: list[dict[str, Any]] = []
    for selection, choice in choices.items():  # 'last' first: the weights in memory are the last epoch's
        model.test_log_prefix = "test" if selection == "last" else f"test_{selection}"
        trainer.test(model, datamodule=datamodule, ckpt_path=choice["checkpoint"], verbose=False, weights_only=True)
        predictions += [
            {"selection": selection, **p, "patient": patients.get((p["site"], p["file"]), "")}
            for p in model.test_predictions
        ]
        if datamodule.unseen_sites:  # the weights just tested, on the sites never trained on
            predictions += [{"selection": selection, **r} for r in _unseen_site_rows(trainer, model, datamodule)]
        checkpoint = Path(choice["checkpoint"] or output_dir / LAST_CHECKPOINT).resolve()
        choice["checkpoint"] = str(checkpoint.relative_to(output_dir.resolve()))  # Lightning resolves symlinks
    return recomputed_test(choices, predictions, "mean"), predictions


def _unseen_site_rows(trainer: pl.Trainer, model: Any, datamodule: Any) -> list[dict[str, Any]]:
    """Predictions of every site of data.test_sites with each norm choice the method allows (covidct.evaluate),
    under the trainer's precision, as the test step."""
    model.eval()
    rows = []
    for site in datamodule.unseen_sites:

        def images(site: str = site) -> Iterator[torch.Tensor]:
            for batch in datamodule.unseen_loader(site, 0):
                batch["image"] = batch["image"].to(model.device)
                yield datamodule.on_after_batch_transfer(batch, 0)["image"]

        with trainer.precision_plugin.forward_context():
            rows += unseen_site_rows(model, site, datamodule.splits[site]["test"], images)
    return rows


def _shown_predictions(rows: list[dict[str, Any]], datamodule: Any, pseudonyms: Pseudonyms) -> list[dict[str, Any]]:
    """The prediction rows as the record shows them: patient ids, and the patient folders of folder-kind sites,
    as pseudonyms unless patient_ids=raw (the metrics, computed before, are the same either way)."""
    folders: dict[str, set[str]] = {}
    for row in rows:
        if row["site"] in datamodule.specs:
            folders.setdefault(row["patient"], set()).update(
                patient_folders(datamodule.specs[row["site"]], row["file"])
            )
    return pseudonyms.rows(rows, folders)


def data_record(datamodule: Any, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a record says of the data a run read: each site's parts, their fingerprint, the root, the site files."""
    return {
        "splits": datamodule.split_summary(),
        "data_fingerprint": fingerprint,
        "data_root": str(datamodule.root),  # absolute: the run's data wherever the record is read
        "sites": {name: spec.as_dict() for name, spec in datamodule.specs.items()},
    }


def recorded_run(
    cfg: DictConfig, data: dict[str, Any], pseudonyms: Pseudonyms, selections: list[str]
) -> dict[str, Any]:
    """The record's `run` block as every run has it (a centralised or a federated one): identity, data
    (`data_record`, or a deployed federation's sites' own reports), sites, protocol, commit."""
    return {
        "experiment": cfg.name,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "split_seed": cfg.split_seed,
        "group_by": cfg.data.group_by,
        "selections": selections,
        "patient_pooling": "mean",
        "patient_ids": cfg.patient_ids,
        "pseudonym_key_id": pseudonyms.key_id,  # records whose pseudonyms match share it
        "git_commit": git_commit(),
        "splits": data["splits"],
        "data_fingerprint": data["data_fingerprint"],
        "data_root": data["data_root"],
        "sites": data["sites"],
        "protocol": OmegaConf.to_container(cfg.protocol) if cfg.get("protocol") else None,
    }


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Fit on the training part, test the last (and best-validation) checkpoint, write the run record.

    Returns the record's "test" part. A folder with a complete record is skipped; an interrupted run
    resumes from its last checkpoint. An experiment with a `federated` node trains through Flower instead
    (covidct/federated/fit.py), into the same record.
    """
    check_config(cfg)
    if (Path(output_dir) / METRICS_FILE).is_file():  # before anything logs: the data scan, the lock
        _stop_logging_into(Path(output_dir))
    if cfg.get("federated") is not None:
        from covidct.federated.fit import train_federated  # Flower (and Ray) load for a federated run only

        return train_federated(cfg, output_dir)
    with run_dir_lock(Path(output_dir), wait=bool(cfg.get("wait_for_run_folder"))):
        return _train_locked(cfg, Path(output_dir))


def _stop_logging_into(folder: Path) -> None:
    """A finished run's folder is never written, so a committed record stays byte-identical: the job's log file
    there (Hydra's run.log) is closed; the console still says why the run is skipped."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == folder.resolve():
            root.removeHandler(handler)
            handler.close()


def claim_folder(cfg: DictConfig, output_dir: Path, read_data: bool = True) -> tuple[Any, dict[str, Any], RunState]:
    """The run's DataModule, its data fingerprint and its folder claimed (prepare_run_dir), for a centralised or a
    federated run; a folder with a complete record (`state.record`) is skipped, and the log says so. Without
    `read_data` (a deployed federation: the data lie at the sites, which check their own) neither DataModule nor
    fingerprint (None)."""
    datamodule = build(cfg.data, _convert_="all") if read_data else None
    fingerprint = datamodule.fingerprint() if read_data else None
    state = prepare_run_dir(cfg, output_dir, fingerprint)
    if state.record is not None:
        log.info("complete run record in %s: skipping (delete the folder to run again)", output_dir)
    return datamodule, fingerprint, state


def _train_locked(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    datamodule, fingerprint, state = claim_folder(cfg, output_dir)
    if state.record is not None:
        return state.record["test"]
    note = OmegaConf.select(cfg, "protocol.note", default=None)
    if note:
        log.warning("%s", note)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule.setup("fit")
    model = build(cfg.model, sites=datamodule.sites, _convert_="all")
    identity = {
        "fold": cfg.fold,
        "split_seed": cfg.split_seed,
        "group_by": cfg.data.group_by,
        "data_fingerprint": fingerprint,
    }
    model.run_identity = identity
    model.run_settings = run_settings(cfg)
    resume_from, warm_start = state.checkpoint, None
    if resume_from is not None:  # its own (its settings are the folder's): a warm start it began with is kept
        warm_start = check_checkpoint(resume_from, model, identity).get("warm_start")
    elif cfg.get("resume_from"):
        given = Path(cfg.resume_from)
        trained_on = check_checkpoint(given, model, identity, warm_start=cfg.warm_start, settings=model.run_settings)
        if cfg.warm_start:  # its weights only: training starts at epoch 0 of this run's folds
            model.load_state_dict(read_checkpoint(given)["state_dict"])
            warm_start = {"checkpoint": str(given), "trained_on": trained_on}
            log.info("warm start from the weights of %s", given)
        else:
            resume_from = given
    if warm_start:
        model.run_identity = {**identity, "warm_start": warm_start}
    if resume_from is not None:
        point = resume_point(read_checkpoint(resume_from), cfg.trainer.max_epochs)
        log.info("resuming from %s at %s", resume_from, point)
    elif state.started:
        log.info(
            "%s holds an interrupted run that left no checkpoint (one is written at each epoch's end, every "
            "callbacks.last_checkpoint.every_minutes and on Ctrl-C): starting from step 0",
            output_dir,
        )
    validation = datamodule.has_validation()
    logger = _logger(cfg, output_dir)
    callbacks = _callbacks(cfg, output_dir, validation, logger)
    no_validation = {} if validation else {"limit_val_batches": 0}
    trainer = make_trainer(
        cfg, logger=logger, callbacks=list(callbacks.values()), default_root_dir=str(output_dir), **no_validation
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    if trainer.interrupted or trainer.current_epoch < trainer.max_epochs or trainer.global_step == 0:
        raise TrainingIncomplete(
            f"training stopped after {trainer.current_epoch} of {trainer.max_epochs} epochs "
            f"({trainer.global_step} steps): no record written; rerun the same command to resume from "
            f"{output_dir / LAST_CHECKPOINT}."
        )
    test, predictions = _test_selections(trainer, model, datamodule, callbacks.get("best_checkpoint"), output_dir)
    pseudonyms = Pseudonyms(cfg.patient_ids, cfg.pseudonym_key)
    predictions = _shown_predictions(predictions, datamodule, pseudonyms)
    run = recorded_run(cfg, data_record(datamodule, fingerprint), pseudonyms, list(test)) | {
        "epochs_trained": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "device": _device_name(trainer),
        "precision": str(trainer.precision),  # what ran: 'auto' chosen, as Lightning runs it
        **({"warm_start": warm_start} if warm_start else {}),
    }
    if not trainer.is_global_zero:
        return test
    path = write_run_record(output_dir, test, predictions, run, recorded_config(cfg))
    throughput = callbacks.get("throughput")
    if throughput is not None:
        throughput.write(output_dir)
        for epoch in throughput.epochs:
            number, seconds, speed = epoch["epoch"] + 1, epoch["seconds"], epoch["img_per_s"]
            log.info("epoch %d/%d: %.1f s training, %.1f img/s", number, trainer.max_epochs, seconds, speed)
    if not cfg.keep_optimizer_state:
        drop_optimizer_state(output_dir / "checkpoints")
    _finish_logger(logger, test, predictions)
    log.info("run record: %s", path)
    if note:
        log.warning("%s", note)
    log_test(test)
    return test


def log_test(test: dict[str, Any]) -> None:
    """Each selection's metrics per site and level, one line each, at the end of the run's log."""
    for selection, result in test.items():
        for level, sites in (("image", result["images"]), ("patient", result["patients"])):
            for site, values in sites.items():
                text = "  ".join(f"{k}={'undefined' if v is None else f'{v:.4f}'}" for k, v in values.items())
                log.info("test %s, %s-level, site %s: %s", selection, level, site, text)
        for how, unseen in result.get("unseen", {}).items():
            for site, values in unseen["images"].items():
                text = "  ".join(f"{k}={'undefined' if v is None else f'{v:.4f}'}" for k, v in values.items())
                log.info("test %s, image-level, unseen site %s (unseen_norm=%s): %s", selection, site, how, text)
