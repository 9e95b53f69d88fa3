"""What a stopped run resumes from: checkpoints written atomically, at every epoch's end, every few minutes and
on a stop signal, so a killed run loses at most its last checkpoint interval. Lightning checkpoints what it
can (weights, optimizer, loops, the loader's place in its epoch); what it lacks is here."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from covidct.atomic import atomic_write
from covidct.errors import STOP_SIGNALS, DataError, RunInterrupted

log = logging.getLogger("covidct.resume")


def _size_of_last(filepath: str) -> str:
    """The size of the checkpoint being replaced, as a guide to the space a new one needs."""
    path = Path(filepath)
    return (
        f"{path.stat().st_size / 2**20:.0f} MiB" if path.is_file() else "as much as the model's weights and Adam state"
    )


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes to a temp file beside the checkpoint and renames it, so a kill mid-write never
    corrupts the checkpoint a rerun resumes from. Lightning's own save stages the file in the system's temp folder
    and moves it: a copy, not a rename, where that folder is another file system."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not trainer.is_global_zero:  # writes nothing on the other ranks, but they must join its barrier
            super()._save_checkpoint(trainer, filepath)
            return

        def save(temp: Path) -> None:
            super(AtomicCheckpoint, self)._save_checkpoint(trainer, str(temp))

        try:
            atomic_write(Path(filepath), save)
        except OSError as err:  # e.g. a full disk
            raise DataError(
                f"cannot write checkpoint {filepath} ({err.strerror or err}); a checkpoint of this run takes about "
                f"{_size_of_last(filepath)}: free that much space and rerun to resume."
            ) from None
        self._last_checkpoint_saved = filepath


RANKS_AGREE_EVERY = 10  # steps between the ranks' agreement on a stop or a timed checkpoint (a device sync each)


class LastCheckpoint(AtomicCheckpoint):
    """The checkpoint a rerun resumes from, so that a stopped run loses at most `every_minutes` of training:
    written at every epoch's end, after the first step that ends `every_minutes` or more after the last one
    was written, and, on SIGINT (Ctrl-C), SIGTERM or SIGHUP, after the step in progress, before the run stops with
    RunInterrupted. A second Ctrl-C stops at once. Mid-epoch checkpoints hold the loader's next batch
    (TrainLoader.state_dict, which Lightning checkpoints), so the resumed run sees exactly the batches an
    uninterrupted one would.
    The last step of an epoch is never saved on its own: the epoch's own checkpoint follows it, after the
    epoch-end work (schedule step, validation) that a resume from that step would skip; nor is a step in the
    middle of a gradient accumulation. Under DDP the ranks agree every RANKS_AGREE_EVERY steps.
    Not ModelCheckpoint's `train_time_interval`: Lightning refuses it beside epoch-end saving (the two are mutually
    exclusive there), and it would save an epoch's last step and steps inside an accumulation."""

    def __init__(self, every_minutes: float | None = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every_minutes = every_minutes
        self._saved_at = time.monotonic()
        self._stop: int | None = None
        self._handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = time.monotonic()
        self._stop = signal.SIGTERM if trainer.received_sigterm else None  # one that came while setting up
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._handlers = {number: signal.signal(number, self._request_stop) for number in STOP_SIGNALS}

    def _request_stop(self, number: int, frame: Any) -> None:
        if self._stop is not None and number == signal.SIGINT:
            self._restore_handlers()
            raise RunInterrupted(
                "stopped by a second Ctrl-C (SIGINT) in the middle of a step: the steps since the last checkpoint "
                "are lost; rerun the same command to resume from it.",
                number,
            )
        self._stop = number
        message = f"\n{STOP_SIGNALS[number]}: stopping once the step in progress is done and saved"
        message += " (Ctrl-C again stops at once, losing the steps since the last checkpoint)\n"
        os.write(2, message.encode())  # print and logging are not safe inside a signal handler

    def _restore_handlers(self) -> None:
        for number, handler in self._handlers.items():
            signal.signal(number, handler)
        self._handlers = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_handlers()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False):
            self._stopped(trainer, f"at the start of epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False):  # at the last step
            self._stopped(trainer, f"at the end of training (epoch {trainer.max_epochs}/{trainer.max_epochs})")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        done = batch_idx + 1
        if done >= trainer.num_training_batches or done % trainer.accumulate_grad_batches:
            return
        if trainer.world_size > 1 and trainer.global_step % RANKS_AGREE_EVERY:
            return
        due = self.every_minutes is not None and time.monotonic() - self._saved_at >= 60 * self.every_minutes
        stop = trainer.strategy.reduce_boolean_decision(self._stop is not None, all=False)
        if not (stop or trainer.strategy.reduce_boolean_decision(due, all=False)):
            return
        where = f"after batch {done}/{trainer.num_training_batches} of epoch {trainer.current_epoch + 1}/"
        where += f"{trainer.max_epochs}"
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            log.info("checkpoint %s (step %d)", where, trainer.global_step)
        if stop:
            self._stopped(trainer, where)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()

    def _stopped(self, trainer: pl.Trainer, where: str) -> None:
        number = self._stop if self._stop is not None else signal.SIGINT  # another rank's signal
        if self.best_model_path:
            kept = f"the checkpoint {self.best_model_path} holds the run so far: rerun the same command to resume"
        elif trainer.global_step == 0:
            kept = "nothing was trained yet: rerun the same command to start"
        else:
            kept = "this run's folder holds no checkpoint yet: rerun the same command to start again"
        raise RunInterrupted(f"stopped by {STOP_SIGNALS[number]} {where}; {kept}.", number)
