"""Train and test one configuration: `python -m covidct.run +experiment=NAME [overrides] [-m]`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from covidct.errors import ConfigError, CovidCTError
from covidct.records import git_commit, write_run_record
from covidct.report.roc import roc_curve
from covidct.resume import AtomicCheckpoint, check_checkpoint, prepare_run_dir
from covidct.timing import TrainThroughput

log = logging.getLogger("covidct.run")
SELECTIONS = ("last", "best_val_auc")


def _check(cfg: DictConfig) -> None:
    if cfg.select not in SELECTIONS:
        raise ConfigError(f"select must be one of {SELECTIONS}, got {cfg.select!r}.")
    if cfg.select == "best_val_auc" and not cfg.data.val_fraction:
        raise ConfigError("select=best_val_auc needs a validation part: set data.val_fraction > 0.")


def _build(node: DictConfig, **kwargs: Any) -> Any:
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
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def _device_name(trainer: pl.Trainer) -> str:
    root = trainer.strategy.root_device
    return torch.cuda.get_device_name(root) if root.type == "cuda" else root.type


def _finish_logger(logger: Any, results: dict[str, dict[str, float]], predictions: list[dict[str, Any]]) -> None:
    """W&B: final test metrics into the run summary, a ROC curve per site, and close the run so the next
    job of a sweep gets its own."""
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    experiment = logger.experiment
    for site, values in results.items():
        for name, value in values.items():
            experiment.summary[f"final/{site}/{name}"] = value
        rows = [p for p in predictions if p["site"] == site]
        fpr, tpr, auc = roc_curve([p["label"] for p in rows], [p["prob_covid"] for p in rows])
        table = wandb.Table(columns=["fpr", "tpr"], data=[[f, t] for f, t in zip(fpr, tpr)])
        roc = wandb.plot.line(table, "fpr", "tpr", title=f"ROC, site {site} (AUC {100 * auc:.1f})")
        experiment.log({f"test/{site}/roc": roc})
    experiment.finish()


def _drop_optimizer_state(folder: Path) -> None:
    """A finished run is never resumed: keep the weights, drop the Adam state (two thirds of each file)."""
    for path in folder.glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint.pop("optimizer_states", None)
        checkpoint.pop("lr_schedulers", None)
        partial = path.with_name(path.name + ".partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)


def make_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """The configured Trainer; precision 'auto' means bf16 autocast on a GPU that has it, else fp32."""
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return instantiate(cfg.trainer, precision=precision, **kwargs)


def _checkpoint_callbacks(output_dir: Path, best: bool) -> tuple[list[AtomicCheckpoint], AtomicCheckpoint]:
    """All checkpoint callbacks, and the one whose file is tested: 'last' (saved every epoch, what a rerun
    resumes from) or, with best_val_auc, the best validation AUC.

    Each is one file that replaces itself: checkpoints hold the Adam state, ~0.6 GB at full width.
    """
    last = AtomicCheckpoint(
        dirpath=output_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    if not best:
        return [last], last
    best_auc = AtomicCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor="val/auc",
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    return [last, best_auc], best_auc


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Fit on the training part, select a checkpoint without the test fold, test, write the run record.

    A folder with a complete record is skipped; an interrupted run resumes from its last checkpoint.
    """
    _check(cfg)
    output_dir = Path(output_dir)
    state = prepare_run_dir(cfg, output_dir)
    if state.record is not None:
        log.info("complete run record in %s: skipping (delete the folder to run again)", output_dir)
        return {site: state.record[site] for site in state.record if site not in ("run", "config")}
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _build(cfg.data, _convert_="all")
    datamodule.setup("fit")
    model = _build(cfg.model, _convert_="all")
    resume_from = state.checkpoint or (Path(cfg.resume_from) if cfg.get("resume_from") else None)
    if resume_from is not None:
        check_checkpoint(resume_from, model)
        log.info("resuming from %s", resume_from)
    best = cfg.select == "best_val_auc"
    checkpoints, selected = _checkpoint_callbacks(output_dir, best)
    logger = _logger(cfg, output_dir)
    throughput = TrainThroughput()
    callbacks = [*checkpoints, throughput] + ([LearningRateMonitor("epoch")] if logger else [])
    trainer = make_trainer(cfg, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir))
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    ckpt_path = selected.best_model_path
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path or None, verbose=False)
    run = {
        "experiment": cfg.name,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "split_seed": cfg.split_seed,
        "group_by": cfg.data.group_by,
        "model_selection": cfg.select,
        "checkpoint": str(Path(ckpt_path).relative_to(output_dir)) if ckpt_path else None,
        "epochs_trained": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "git_commit": git_commit(),
        "device": _device_name(trainer),
        "splits": datamodule.split_summary(),
    }
    if not trainer.is_global_zero:
        return model.test_results
    path = write_run_record(
        output_dir, model.test_results, model.test_predictions, run, OmegaConf.to_container(cfg, resolve=True)
    )
    throughput.write(output_dir)
    for epoch in throughput.epochs:
        log.info("epoch %d: %.1f s training, %.1f img/s", epoch["epoch"], epoch["seconds"], epoch["img_per_s"])
    if not cfg.keep_optimizer_state:
        _drop_optimizer_state(output_dir / "checkpoints")
    _finish_logger(logger, model.test_results, model.test_predictions)
    log.info("run record: %s", path)
    for site, values in model.test_results.items():
        log.info("test %s: %s", site, "  ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return model.test_results


def _user_message(err: CovidCTError) -> str:
    """Errors raised in DataLoader workers arrive wrapped in the worker's traceback; keep the message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except CovidCTError as err:
        print(f"error: {_user_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
