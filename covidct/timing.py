"""Training throughput and finishing time of a real run, written beside its record (`timing.json`; not in
metrics.json, which stays byte-identical across reruns of the same seed)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from covidct.atomic import atomic_write_text
from covidct.records import TIMING_FILE

log = logging.getLogger("covidct.run")


class TrainThroughput(pl.Callback):
    """Wall time and images per second of each training epoch (its validation excluded).

    It waits for the device once per epoch, at the last training batch; never within the epoch.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._start = 0.0
        self._images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch skips that epoch's start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images, self._batches = time.perf_counter(), 0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch["label"])
        self._batches += 1
        if batch_idx + 1 >= trainer.num_training_batches:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            seconds = time.perf_counter() - self._start
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "seconds": seconds,
                    "batches": self._batches,  # fewer than the epoch's in an epoch resumed mid-way
                    "images": self._images,
                    "img_per_s": self._images / seconds,
                }
            )

    def write(self, output_dir: Path) -> Path:
        path = Path(output_dir) / TIMING_FILE
        finished = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        atomic_write_text(path, json.dumps({"finished_at": finished, "train_epochs": self.epochs}, indent=2) + "\n")
        return path


def steps_left(trainer: pl.Trainer, batch_idx: int) -> int:
    """Training steps still to run after batch `batch_idx` of the current epoch, to the end of the run."""
    per_epoch = trainer.num_training_batches
    return (per_epoch - batch_idx - 1) + per_epoch * (trainer.max_epochs - trainer.current_epoch - 1)


def duration(seconds: float) -> str:
    """A duration as h:mm:ss (or m:ss), as progress bars print it."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar, with the epoch out of the run's total and the time left for the whole run, not only the
    epoch's: the wall time per step so far (validation and epoch ends included), times the steps to go."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._first: float | None = None  # the end of the first step here, which includes setting up
        self._timed_steps = 0
        self._left: str | None = None
        if trainer.fit_loop.restarted_mid_epoch:  # whose epoch start Lightning skips
            self.on_train_epoch_start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:  # Lightning's, with our description
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = self.total_train_batches
        self.train_progress_bar.reset(total=None if total == float("inf") else total)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        else:
            self._timed_steps += 1
            self._left = duration((now - self._first) / self._timed_steps * steps_left(trainer, batch_idx))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: always 0 in a run's own folder
        if trainer.training and getattr(self, "_left", None):
            items["run left"] = self._left
        return items


class RunSummary(pl.Callback):
    """Says what a run is and what it will cost: one block at the start (experiment, method, sites and their
    counts, device and precision, steps, epochs, folder), then, once `estimate_after` steps are timed (the first
    step, which sets things up, not counted), the estimated time left for training; then a line at each epoch's
    end (its time and loss, the time left), so run.log follows the run as it goes."""

    def __init__(self, experiment: str, estimate_after: int = 20) -> None:
        self.experiment = experiment
        self.estimate_after = max(1, estimate_after)
        self._timed: list[float] = []
        self._estimated = False
        self._started = self._epoch_started = time.perf_counter()
        self._steps_done = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed, self._estimated = [], not trainer.is_global_zero  # one voice under DDP
        self._started = self._epoch_started = time.perf_counter()  # a run resumed mid-epoch skips its start
        self._steps_done = 0
        if not trainer.is_global_zero:
            return
        lines = [f"run: experiment {self.experiment}, method {type(pl_module).__name__}"]
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "split_summary"):
            for site, parts in datamodule.split_summary()["sites"].items():
                counts = ", ".join(f"{part} {values['images']}" for part, values in parts.items())
                lines.append(f"  site {site}: {counts} images")
        device = trainer.strategy.root_device
        lines.append(f"  device {device.type} ({trainer.world_size} process(es)), precision {trainer.precision}")
        epochs = f"epochs {trainer.current_epoch + 1}..{trainer.max_epochs} of {trainer.max_epochs}"
        lines.append(f"  {trainer.num_training_batches} steps per epoch, {epochs}")
        lines.append(f"  folder {Path(trainer.default_root_dir).resolve()}")
        log.info("\n".join(lines))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps_done += 1
        if self._estimated:
            return
        self._timed.append(time.perf_counter())
        if len(self._timed) <= self.estimate_after:
            return
        self._estimated = True
        per_step = (self._timed[-1] - self._timed[0]) / (len(self._timed) - 1)
        left = steps_left(trainer, batch_idx)
        log.info(
            "estimated training time left: %s (%.2f s per step, %d steps to go)",
            duration(per_step * left),
            per_step,
            left,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self._steps_done:
            return
        now = time.perf_counter()
        loss = trainer.callback_metrics.get("train/loss_epoch")
        per_step = (now - self._started) / self._steps_done
        log.info(
            "epoch %d/%d done in %s%s; training time left %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            duration(now - self._epoch_started),
            "" if loss is None else f", train loss {float(loss):.4f}",
            duration(per_step * steps_left(trainer, trainer.num_training_batches - 1)),
        )
