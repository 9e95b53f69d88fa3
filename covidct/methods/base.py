"""The shared base of every method: optimisation, schedule, per-site evaluation and test predictions.

A method subclasses `SiteMethod` and states only what it adds: the networks it builds, its training
losses (`training_losses`) and how it turns images into logits (`logits`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from covidct.data.sources import SITES
from covidct.errors import ConfigError
from covidct.methods.divergence import DivergenceGuard
from covidct.methods.graphed import GraphedTrainingStep
from covidct.models import CovidNet, SiteMLP
from covidct.models.routing import site_blocks, use_sync_free_routing
from covidct.resume import RUN_IDENTITY_KEY

EVAL_STAGES = ("val", "test")
# Fast-path switches: True, False, or "auto" (on where it helps: on a CUDA device).
SPEED_DEFAULTS: dict[str, Any] = {
    "channels_last": "auto",
    "compile": False,
    "compile_mode": "reduce-overhead",  # torch.compile mode; reduce-overhead adds CUDA graphs
    "cuda_graph": "auto",  # the whole training step as one CUDA graph (methods/graphed.py)
    "cudnn_benchmark": "auto",
    "fused_optimizer": "auto",
    "sync_free_routing": "auto",
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# inside a captured step a compiled graph must not capture graphs of its own
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
LR_SCHEDULES = ("cosine", "step", "constant")


def site_metrics() -> MetricCollection:
    """COVID is the positive class; a probability above 0.5 predicts COVID (torchmetrics' threshold)."""
    return MetricCollection(
        {
            "acc": BinaryAccuracy(),
            "f1": BinaryF1Score(),
            "recall": BinaryRecall(),
            "precision": BinaryPrecision(),
            "auc": BinaryAUROC(),
        }
    )


class SiteMethod(pl.LightningModule):
    """Base LightningModule; batches are dicts with image, label, site (index into SITES) and file."""

    norm_per_site: bool = False
    adapter: str = "none"

    def __init__(
        self,
        backbone: Mapping[str, Any],
        lr: float = 1e-4,
        weight_decay: float = 1e-7,
        lr_schedule: str = "cosine",
        step_size: int = 30,
        step_gamma: float = 0.1,
        speed: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"model.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        self.save_hyperparameters()
        self.backbone_config = dict(backbone)
        unknown = set(speed or {}) - set(SPEED_DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown model.speed key(s) {sorted(unknown)}; known: {sorted(SPEED_DEFAULTS)}.")
        self.speed = {**SPEED_DEFAULTS, **(speed or {})}
        if self.speed["compile_mode"] not in COMPILE_MODES:
            mode = self.speed["compile_mode"]
            raise ConfigError(f"model.speed.compile_mode must be one of {COMPILE_MODES}, got {mode!r}.")
        self.eval_metrics = nn.ModuleDict(
            {f"{stage}_{site}": site_metrics() for stage in EVAL_STAGES for site in SITES}
        )
        self._sites_seen: dict[str, set[str]] = {stage: set() for stage in EVAL_STAGES}
        self._classes_seen: dict[str, dict[str, set[int]]] = {stage: {} for stage in EVAL_STAGES}
        self.test_predictions: list[dict[str, Any]] = []
        self.run_identity: dict[str, Any] = {}  # fold, split seed, data fingerprint (set by covidct.run)
        self.test_log_prefix = "test"  # the run tests several checkpoints and logs each under its own prefix
        self.divergence_guard = DivergenceGuard()
        self._graphed_step: GraphedTrainingStep | None = None

    # What a method defines ------------------------------------------------------------------------
    def make_backbone(self) -> CovidNet:
        """A backbone with one norm (and adapter) per site if the method separates them, else shared norms."""
        num_sites = len(SITES) if self.norm_per_site else 1
        return CovidNet(**self.backbone_config, num_sites=num_sites, adapter=self.adapter)

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Named loss terms; 'loss' is the one optimised."""
        raise NotImplementedError

    def logits(self, image: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def graph_key(self) -> tuple[Any, ...]:
        """Python state the training loss reads besides the batch: a captured step is recaptured when
        it changes (model.speed.cuda_graph)."""
        return ()

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norm is clipped separately: one, the whole model, by default."""
        return [list(self.parameters())]

    def cam_layer(self, site: str) -> nn.Module:
        """The layer whose output Grad-CAM explains for a site: the last PEPX block (7x7 at 224 px)."""
        return self.net.stages[-1][-1]

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this module: the method and its backbone."""
        return {"method": type(self).__name__, "backbone": dict(self.backbone_config)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["covidct"] = self.checkpoint_identity()
        if self.run_identity:  # what it was trained on: resume_from refuses another fold's checkpoint
            checkpoint[RUN_IDENTITY_KEY] = self.run_identity
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                if isinstance(group["lr"], torch.Tensor):  # a captured step's (methods/graphed.py)
                    group["lr"], group["capturable"] = group["lr"].item(), False  # resumable anywhere

    # Fast path --------------------------------------------------------------------------------------
    def uses(self, switch: str) -> bool:
        value = self.speed[switch]
        if value == "auto" and switch == "sync_free_routing" and (self.uses("compile") or self.uses("cuda_graph")):
            return True  # indexed routing's data-dependent shapes would break a compiled or captured graph
        if switch == "cuda_graph" and value:
            return self._cuda_graph_possible(explicit=value != "auto")
        return self.device.type == "cuda" if value == "auto" else bool(value)

    def _cuda_graph_possible(self, explicit: bool) -> bool:
        """What a captured step needs; `auto` quietly goes without it, an explicit `true` says why not."""
        trainer = self._trainer
        needs = {
            "a CUDA device": self.device.type == "cuda",
            "a fused optimizer (model.speed.fused_optimizer)": self.speed["fused_optimizer"] is not False,
            "one process (not DDP)": trainer is None or trainer.world_size == 1,
            "no gradient accumulation": trainer is None or trainer.accumulate_grad_batches == 1,
            "no float16 gradient scaler (use bf16-mixed or 32-true)": trainer is None
            or str(trainer.precision) != "16-mixed",
        }
        missing = [need for need, met in needs.items() if not met]
        if missing and explicit:
            raise ConfigError(f"model.speed.cuda_graph=true needs {'; '.join(missing)}. Set it to auto or false.")
        return not missing

    def enable_fast_path(self) -> None:
        """Apply the configured switches to this module on its current device (training and `make bench`)."""
        use_sync_free_routing(self, self.uses("sync_free_routing"))
        if self.uses("cudnn_benchmark"):
            torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest conv algorithms once
        if self.uses("channels_last"):
            self.to(memory_format=torch.channels_last)
            for module in self.modules():
                if isinstance(module, CovidNet):
                    module.channels_last_input = True
        if self.uses("compile"):
            mode = self.speed["compile_mode"]
            if self.uses("cuda_graph"):
                mode = WITHOUT_CUDA_GRAPHS.get(mode, mode)
            for module in self.modules():
                if isinstance(module, CovidNet):
                    # methods call `features` directly, so that (the whole conv trunk) is what gets compiled
                    module.features = torch.compile(module.features, mode=mode)
                elif isinstance(module, SiteMLP):  # classifier, projection and auxiliary heads
                    module.compile(mode=mode)

    def on_fit_start(self) -> None:
        self.enable_fast_path()
        if self.uses("cuda_graph"):
            warnings.filterwarnings("ignore", message="`training_step` returned `None`")  # on purpose, see there
            trainer = self.trainer
            clip = trainer.gradient_clip_val
            self._graphed_step = GraphedTrainingStep(
                self, self.optimizers().optimizer, clip, trainer.gradient_clip_algorithm
            )

    def on_fit_end(self) -> None:
        self._graphed_step = None  # releases the graph's memory pool

    # Training -----------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self._graphed_step is not None:
            # the whole step, update included, ran here; None tells Lightning there is nothing to backward
            losses, report = self._graphed_step(batch)
            self.divergence_guard.track(report, list(losses), self.current_epoch, self.global_step)
            loss = None
        else:
            with site_blocks(batch.get("site_layout")):
                losses = self.training_losses(batch)
            optimizer = self.optimizers().optimizer if self._trainer is not None else None
            self.divergence_guard.check(losses, optimizer, self.current_epoch, self.global_step)
            loss = losses["loss"]
        self.log_dict(
            # a copy: a replayed graph overwrites its outputs in place
            {f"train/{name}": value.detach().clone() for name, value in losses.items()},
            on_step=True,
            on_epoch=True,
            batch_size=len(batch["label"]),
            sync_dist=True,  # a no-op on one device; under DDP the epoch values average the ranks
        )
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self._graphed_step is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # runs training_step, which stepped the optimizer inside the graph

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._graphed_step is None:  # a captured step owns its gradient buffers
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # wait for the device at the epoch's end only, so no checkpoint follows a non-finite loss
        self.divergence_guard.poll(wait=batch_idx + 1 >= self.trainer.num_training_batches)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here: Lightning's mixed-precision plugin refuses to clip for fused optimizers even under
        bf16, where no gradient scaler is involved (float16 runs get an unfused optimizer instead)."""
        self.clip_gradients_(gradient_clip_val, gradient_clip_algorithm)

    def clip_gradients_(self, value: float | None, algorithm: str | None = "norm") -> None:
        """Clip each of `clip_groups` in place, with no host sync (a captured step does this too)."""
        if not value:
            return
        for group in self.clip_groups():
            if algorithm == "value":
                nn.utils.clip_grad_value_(group, value)
            else:
                nn.utils.clip_grad_norm_(group, value)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # a float16 gradient scaler must unscale before clipping, which a fused Adam would do only in its step
        # a captured step skips a non-finite update inside the fused kernel, so it implies a fused Adam
        wants_fused = self.uses("fused_optimizer") or self.uses("cuda_graph")
        fused = (wants_fused and str(self.trainer.precision) != "16-mixed") or None
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        if hp.lr_schedule == "cosine":
            epochs = self.trainer.max_epochs
            if not epochs or epochs < 1:
                raise ConfigError("the cosine schedule needs trainer.max_epochs >= 1.")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        elif hp.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.step_size, hp.step_gamma)
        else:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # Evaluation ---------------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Mapping[str, Any]) -> None:
        with site_blocks(batch.get("site_layout")):
            prob = self.logits(batch["image"], batch["site"]).float().softmax(-1)[:, 1]
        label, site = batch["label"], batch["site"]
        for s in site.unique().tolist():
            mask = site == s
            self.eval_metrics[f"{stage}_{SITES[s]}"].update(prob[mask], label[mask])
            self._sites_seen[stage].add(SITES[s])
            self._classes_seen[stage].setdefault(SITES[s], set()).update(label[mask].unique().tolist())
        if stage == "test":
            for f, y, s, p in zip(batch["file"], label.tolist(), site.tolist(), prob.tolist()):
                self.test_predictions.append({"site": SITES[s], "file": f, "label": y, "prob_covid": p})

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
