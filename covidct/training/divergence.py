"""Stopping at a non-finite loss, with or without waiting for the device every step."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from covidct.errors import TrainingDiverged

# what happened to the update of a step whose loss was not finite
SKIPPED, NOT_RUN, RAN = "skipped", "not run", "ran"
_HOW = {
    SKIPPED: "Its update was skipped on the device and training stopped",
    NOT_RUN: "Training stopped before this step's update",
    RAN: "Its update ran (an unfused optimizer) and training stopped",
}


def _diverged(epoch: int, step: int, terms: Mapping[str, float], update: str) -> TrainingDiverged:
    listed = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
    return TrainingDiverged(
        f"the training loss became non-finite at epoch {epoch}, step {step} ({listed}). {_HOW[update]}; the "
        "checkpoint of the last finished epoch is kept. Lower model.optimizer.lr, or check the data of this run."
    )


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


class DivergenceGuard(pl.Callback):
    """Raises TrainingDiverged for the first step whose loss is NaN or inf; no checkpoint follows it.

    With a fused optimizer nothing waits for the device: the flag goes to the optimizer as `found_inf`
    (as GradScaler does), so the fused kernel skips that step's update on the device, and the host
    reads the flag through a non-blocking copy once it has arrived, waiting only before a checkpoint is
    written, before validation and at the end of an epoch. Otherwise the loss is read at once: one host
    sync per step, which costs nothing on the CPU. A captured step (training/captured.py) calls `flag`
    and `track` itself.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[int, int, list[str], torch.Tensor, torch.cuda.Event | None, str]] = deque()
        self._bad: torch.Tensor | None = None  # any micro-batch of the step to come not finite (fused)
        self._loss: torch.Tensor | None = None

    # Lightning's automatic optimization --------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Every micro-batch's loss (gradient accumulation included), before its backward."""
        loss = loss.detach()
        if not is_fused(trainer.optimizers[0]):
            if not torch.isfinite(loss):
                raise _diverged(trainer.current_epoch, trainer.global_step, {"loss": loss.item()}, NOT_RUN)
            return
        bad = (~torch.isfinite(loss)).float()
        self._bad = bad if self._bad is None else torch.maximum(self._bad, bad)
        self._loss = loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._bad is None:
            return
        optimizer.found_inf = self._bad  # the fused kernel skips the update if set
        report = torch.stack([self._bad, self._loss.float()])
        self.track(report, ["loss"], trainer.current_epoch, trainer.global_step, SKIPPED)
        self._bad = self._loss = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.poll(wait=batch_idx + 1 >= trainer.num_training_batches)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.poll(wait=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.poll(wait=True)  # raising here aborts the save: no checkpoint follows a non-finite step

    # The checks ----------------------------------------------------------------------------------
    @staticmethod
    def flag(losses: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """On the device only (it may be captured in a CUDA graph): makes a fused optimizer skip this
        step's update if the loss is not finite; returns [flag, *loss terms] for `track`."""
        bad = (~torch.isfinite(losses["loss"].detach())).float()
        if is_fused(optimizer):  # an unfused Adam refuses the flag; its update goes ahead
            optimizer.found_inf = bad
        return torch.stack([bad, *(v.detach().float() for v in losses.values())])

    def track(self, report: torch.Tensor, names: list[str], epoch: int, step: int, update: str = SKIPPED) -> None:
        """Start copying a step's report to the host, without waiting for it; `update`: what became of the
        update of a flagged step."""
        cuda = report.device.type == "cuda"
        host = torch.empty(report.shape, pin_memory=cuda)
        host.copy_(report, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((epoch, step, names, host, event, update))

    def poll(self, wait: bool = False) -> None:
        """Raise for the first non-finite step whose flag has reached the host (all of them if `wait`)."""
        while self._pending:
            epoch, step, names, host, event, update = self._pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self._pending.popleft()
            if host[0] > 0:
                self._pending.clear()
                raise _diverged(epoch, step, dict(zip(names, host[1:].tolist())), update)
