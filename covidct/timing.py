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

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch["label"])
        if batch_idx + 1 >= trainer.num_training_batches:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            seconds = time.perf_counter() - self._start
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "seconds": seconds,
                    "images": self._images,
                    "img_per_s": self._images / seconds,
                }
            )

    def write(self, output_dir: Path) -> Path:
        path = Path(output_dir) / TIMING_FILE
        finished = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        atomic_write_text(path, json.dumps({"finished_at": finished, "train_epochs": self.epochs}, indent=2) + "\n")
        return path


class RunSummary(pl.Callback):
    """Says what a run is and what it will cost: one block at the start (experiment, method, sites and their
    counts, device and precision, steps, epochs, folder), then, once `estimate_after` steps are timed (the first
    step, which sets things up, not counted), the estimated time left for training."""

    def __init__(self, experiment: str, estimate_after: int = 20) -> None:
        self.experiment = experiment
        self.estimate_after = max(1, estimate_after)
        self._timed: list[float] = []
        self._estimated = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timed, self._estimated = [], not trainer.is_global_zero  # one voice under DDP
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
        epochs = f"epochs {trainer.current_epoch}..{trainer.max_epochs - 1}"
        lines.append(f"  {trainer.num_training_batches} steps per epoch, {epochs}")
        lines.append(f"  folder {Path(trainer.default_root_dir).resolve()}")
        log.info("\n".join(lines))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._estimated:
            return
        self._timed.append(time.perf_counter())
        if len(self._timed) <= self.estimate_after:
            return
        self._estimated = True
        per_step = (self._timed[-1] - self._timed[0]) / (len(self._timed) - 1)
        left = (trainer.num_training_batches - batch_idx - 1) + trainer.num_training_batches * (
            trainer.max_epochs - trainer.current_epoch - 1
        )
        minutes = per_step * left / 60
        log.info("estimated training time left: %.1f min (%.2f s per step, %d steps to go)", minutes, per_step, left)
