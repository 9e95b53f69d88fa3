"""The method contract: what every method of Table I is, and nothing else.

A method subclasses `SiteMethod` and states only what it adds: the networks it builds, its training
losses (`training_losses`) and how it turns images into logits (`logits`). The base holds the sites, the
optimiser and schedule (built from their config nodes), per-site evaluation and test predictions.
How fast a step runs, and the guard against a diverging loss, attach from covidct/training as callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from covidct.checkpoints import RUN_IDENTITY_KEY, RUN_SETTINGS_KEY
from covidct.errors import ConfigError
from covidct.metrics import DECISION_THRESHOLD
from covidct.models import CovidNet
from covidct.models.routing import Sites, batch_sites
from covidct.training.clipping import clip_gradients

EVAL_STAGES = ("val", "test")


def site_metrics() -> MetricCollection:
    """COVID is the positive class, predicted above the records' decision threshold."""
    return MetricCollection(
        {
            "acc": BinaryAccuracy(threshold=DECISION_THRESHOLD),
            "f1": BinaryF1Score(threshold=DECISION_THRESHOLD),
            "recall": BinaryRecall(threshold=DECISION_THRESHOLD),
            "precision": BinaryPrecision(threshold=DECISION_THRESHOLD),
            "auc": BinaryAUROC(),
        }
    )


def method_path(cls: type) -> str:
    """Where a method class lives: what checkpoints store to rebuild it (covidct.inference)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class SiteMethod(pl.LightningModule):
    """Batches are dicts with image, label, site (index into `sites`), file and the site blocks they declare.

    The config nodes (`_target_` dicts, conf/model/) are kept as given, so a checkpoint holds plain data and
    rebuilds its method anywhere: `backbone` a CovidNet, `optimizer` a partial taking the parameters,
    `scheduler` a partial taking the optimizer (None: a constant learning rate).
    """

    # one whole network per site (Single): a site it never saw can only borrow one (models/unseen.py)
    networks_per_site: bool = False

    def __init__(
        self,
        sites: Sequence[str],
        backbone: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the loggers get the whole run config (covidct.run)
        self.sites = [str(s) for s in sites]
        self.backbone_config = dict(backbone)
        self.build_optimizer: Callable[..., torch.optim.Optimizer] = instantiate(optimizer)
        self.build_scheduler = instantiate(scheduler) if scheduler else None
        self.eval_metrics = nn.ModuleDict(
            {f"{stage}_{site}": site_metrics() for stage in EVAL_STAGES for site in self.sites}
        )
        self._sites_seen: dict[str, set[str]] = {stage: set() for stage in EVAL_STAGES}
        self._classes_seen: dict[str, dict[str, set[int]]] = {stage: {} for stage in EVAL_STAGES}
        self.test_predictions: list[dict[str, Any]] = []
        self.run_identity: dict[str, Any] = {}  # fold, split seed, data fingerprint (set by covidct.run)
        self.run_settings: dict[str, Any] = {}  # the run's semantic config (set by covidct.run)
        self.test_log_prefix = "test"  # the run tests several checkpoints and logs each under its own prefix

    # What a method defines ------------------------------------------------------------------------
    def make_backbone(self) -> CovidNet:
        """The configured backbone: its norms and adapters one per site, or shared, as conf/model says."""
        num_sites = self.backbone_config.get("num_sites", 1)
        if num_sites not in (1, len(self.sites)):
            raise ConfigError(
                f"model.backbone.num_sites is {num_sites}, but the data has {len(self.sites)} site(s) "
                f"({', '.join(self.sites)}): use 1 (shared norms) or ${{num_sites:${{data.sites}}}} (one per site)."
            )
        return instantiate(self.backbone_config)

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Named loss terms; 'loss' is the one optimised. Anything else it reads that changes over training
        must be a tensor updated in place (a buffer), so that a captured step sees it."""
        raise NotImplementedError

    def logits(self, image: torch.Tensor, sites: Sites) -> torch.Tensor:
        raise NotImplementedError

    def prob_covid(self, image: torch.Tensor, sites: Sites) -> torch.Tensor:
        """P(COVID) of each image through its site's branch: the one score that training's evaluation, evaluate,
        predict and explain all report (in fp32, whatever the autocast)."""
        return self.logits(image, sites).float().softmax(-1)[:, 1]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norm is clipped separately: one, the whole model, by default."""
        return [list(self.parameters())]

    def cam_layer(self, site: str) -> nn.Module:
        """The layer whose output Grad-CAM explains for a site: the last PEPX block (7x7 at 224 px)."""
        return self.net.stages[-1][-1]

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this module: the method, its backbone and its sites
        in order (a site's norms and adapters are found by its place in the list)."""
        return {"method": method_path(type(self)), "backbone": dict(self.backbone_config), "sites": self.sites}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["covidct"] = self.checkpoint_identity()
        if self.run_identity:  # what it was trained on: resume_from refuses another fold's checkpoint
            checkpoint[RUN_IDENTITY_KEY] = self.run_identity
        if self.run_settings:  # how it was trained: resume_from refuses to continue it under other settings
            checkpoint[RUN_SETTINGS_KEY] = self.run_settings

    # Training -----------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(batch)
        self.log_training_losses({name: value.detach() for name, value in losses.items()}, len(batch["label"]))
        return losses["loss"]

    def log_training_losses(self, losses: Mapping[str, torch.Tensor], batch_size: int) -> None:
        self.log_dict(
            {f"train/{name}": value for name, value in losses.items()},
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=True,  # a no-op on one device; under DDP the epoch values average the ranks
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each of `clip_groups` here: Lightning's mixed-precision plugin refuses to clip for fused
        optimizers even under bf16, where no gradient scaler is involved."""
        clip_gradients(self.clip_groups(), gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer(self.parameters())
        if self.build_scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # Evaluation ---------------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Mapping[str, Any]) -> None:
        prob = self.prob_covid(batch["image"], batch_sites(batch))
        label, site = batch["label"], batch["site"]
        for s in site.unique().tolist():
            mask = site == s
            name = self.sites[s]
            self.eval_metrics[f"{stage}_{name}"].update(prob[mask], label[mask])
            self._sites_seen[stage].add(name)
            self._classes_seen[stage].setdefault(name, set()).update(label[mask].unique().tolist())
        if stage == "test":
            for f, y, s, p in zip(batch["file"], label.tolist(), site.tolist(), prob.tolist()):
                self.test_predictions.append({"site": self.sites[s], "file": f, "label": y, "prob_covid": p})

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Log each site's metrics (the run record computes its own from the test predictions). A site whose
        part holds one class has no AUC: it is not logged, nor counted in the mean that selects checkpoints."""
        prefix = self.test_log_prefix if stage == "test" else stage
        aucs = []
        for site in sorted(self._sites_seen[stage]):
            collection = self.eval_metrics[f"{stage}_{site}"]
            values = {name: float(value) for name, value in collection.compute().items()}
            collection.reset()
            if len(self._classes_seen[stage].get(site, ())) < 2:
                values.pop("auc")
            for name, value in values.items():
                self.log(f"{prefix}/{site}/{name}", value, add_dataloader_idx=False, sync_dist=True)
            if "auc" in values:
                aucs.append(values["auc"])
        self._sites_seen[stage].clear()
        self._classes_seen[stage].clear()
        if aucs:
            self.log(
                f"{prefix}/auc",
                sum(aucs) / len(aucs),
                add_dataloader_idx=False,
                prog_bar=stage == "val",
                sync_dist=True,
            )
