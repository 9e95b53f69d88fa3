"""Shared by the tests: composing experiments, running the CLI, and small test-only modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from covidct.methods import Joint

REPO = Path(__file__).resolve().parents[1]
# CPU-sized settings for wiring tests on phantom data.
FAST = [
    "data.image_size=64",
    "data.batch_per_site=4",
    "data.num_workers=0",
    "data.eval_batch_size=16",
    "model.backbone.width=0.125",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def compose_experiment(name: str, overrides: list[str]) -> DictConfig:
    import covidct.run  # noqa: F401  (registers the run-folder resolver)

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides])


def cli_env(outputs: Path) -> dict[str, str]:
    return {**os.environ, "COVIDCT_OUTPUTS": str(outputs), "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], outputs: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covidct.run", *args],
        cwd=REPO,
        env=cli_env(outputs),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class DivergingJoint(Joint):
    """Joint whose loss turns NaN from a given global step on, to test the divergence guard."""

    def __init__(self, diverge_at_step: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.diverge_at_step = diverge_at_step

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().training_losses(batch)
        if self.global_step >= self.diverge_at_step:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


class RequeueableRun:
    """A training job as hydra-submitit-launcher submits it: on preemption it resubmits itself unchanged."""

    def __init__(self, experiment: str, overrides: list[str], output_dir: Path):
        self.experiment, self.overrides, self.output_dir = experiment, overrides, Path(output_dir)

    def __call__(self) -> dict:
        from covidct.run import train

        return train(compose_experiment(self.experiment, self.overrides), self.output_dir)

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)
