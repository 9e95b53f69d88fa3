"""Training throughput and finishing time of a real run, written beside its record (`timing.json`; not in
metrics.json, which stays byte-identical across reruns of the same seed)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from covidct.atomic import atomic_write_text
from covidct.records import TIMING_FILE


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
