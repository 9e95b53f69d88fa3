"""Shared by the tests: composing experiments, running the CLI, and small test-only modules."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from covidct.data.sampler import collate_with_site_layout
from covidct.methods import Joint, MSNet

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


def compose_experiment(name: str, overrides: list[str], config_dir: Path = REPO / "conf") -> DictConfig:
    """The config `python -m covidct.run experiment=NAME ...` runs with (Hydra's own state set as the CLI sets it,
    so `name` comes from the chosen experiment)."""
    import covidct.resolvers  # noqa: F401  (the config's interpolations)

    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.name = cfg.name  # resolved now: a later compose sets Hydra's state for its own experiment
    return cfg


def cli_env(outputs: Path) -> dict[str, str]:
    return {**os.environ, "COVIDCT_OUTPUTS": str(outputs), "PYTHONUNBUFFERED": "1"}


def run_cli(
    args: list[str],
    outputs: Path,
    timeout: int = 900,
    env: dict[str, str] | None = None,
    module: str = "covidct.run",
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env or cli_env(outputs),
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


class ProximalJoint(Joint):
    """Joint whose loss has FedProx's term written out, (mu / 2) ||w - w_start||^2 over every parameter, w_start
    the weights it starts training from: FedProx's local objective by its definition."""

    def __init__(self, proximal_mu: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self) -> None:  # after the callbacks' (the server's weights are loaded by then)
        self.start = {name: p.detach().clone() for name, p in self.named_parameters()}

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().training_losses(batch)
        distance = sum(((p - self.start[name]) ** 2).sum() for name, p in self.named_parameters())
        losses["loss"] = losses["loss"] + self.proximal_mu / 2 * distance
        return losses


class RecordingMSNet(MSNet):
    """MS-Net that writes down, per epoch, the distinct transfer weights its loss read (in this process)."""

    weights_seen: ClassVar[dict[int, list[float]]] = {}

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        seen = self.weights_seen.setdefault(self.current_epoch, [])
        weight = float(self.transfer_weight)
        if weight not in seen:
            seen.append(weight)
        return super().training_losses(batch)


class StoppingJoint(Joint):
    """Joint that asks Lightning to stop after its first epoch, as an early-stopping callback would."""

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True


class RecordingJoint(Joint):
    """Joint that writes down what every training batch held, as the loop delivered it, and can die mid-epoch.

    $COVIDCT_TEST_SEEN=DIR: one JSON line per batch in DIR/rank<R>.jsonl (epoch, batch, files, a digest of
    each image's pixels). $COVIDCT_TEST_DIE_AT=EPOCH:BATCH: the process exits there at once, as if killed.
    $COVIDCT_TEST_SIGNAL_AT=EPOCH:BATCH:SIGNAL (e.g. 1:5:SIGINT): there, SIGINT goes to the whole process group,
    loader workers included, as Ctrl-C sends it; SIGTERM to this process, as `kill PID` sends it. Environment
    variables, not config, so the killed and the resumed run share one config and one folder.
    """

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        folder = os.environ.get("COVIDCT_TEST_SEEN")
        if folder:
            pixels = [hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16] for image in batch["image"]]
            line = {"epoch": self.current_epoch, "batch": batch_idx, "files": list(batch["file"]), "pixels": pixels}
            with (Path(folder) / f"rank{self.global_rank}.jsonl").open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        if os.environ.get("COVIDCT_TEST_DIE_AT") == f"{self.current_epoch}:{batch_idx}":
            os._exit(137)
        at, _, name = os.environ.get("COVIDCT_TEST_SIGNAL_AT", "").rpartition(":")
        if at == f"{self.current_epoch}:{batch_idx}":
            number = getattr(signal, name)
            os.killpg(os.getpgid(0), number) if number == signal.SIGINT else os.kill(os.getpid(), number)


def read_seen(folder: Path, rank: int = 0) -> dict[int, list[dict]]:
    """RecordingJoint's batches of one rank, by epoch, in the order seen."""
    epochs: dict[int, list[dict]] = {}
    for line in (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines():
        batch = json.loads(line)
        epochs.setdefault(batch["epoch"], []).append(batch)
    return epochs


class RequeueableRun:
    """A training job as hydra-submitit-launcher submits it: on preemption it resubmits itself unchanged."""

    def __init__(self, experiment: str, overrides: list[str], output_dir: Path):
        self.experiment, self.overrides, self.output_dir = experiment, overrides, Path(output_dir)

    def __call__(self) -> dict:
        from covidct.training.fit import train

        return train(compose_experiment(self.experiment, self.overrides), self.output_dir)

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


TINY_MODEL = ["data.image_size=64", "model.backbone.width=0.125"]


def tiny_method(experiment: str, *overrides: str, **kwargs: Any) -> Any:
    """An experiment's method as its config builds it, narrow and at 64 px, on the two paper sites."""
    cfg = compose_experiment(experiment, [*TINY_MODEL, *overrides])
    return instantiate(cfg.model, _convert_="all", **kwargs)


def two_site_batch(batch_per_site: int = 4, image_size: int = 64, device: str = "cpu", seed: int = 0) -> dict:
    """A training batch as the DataModule's collate delivers it: site A's block, then site B's, declared."""
    generator = torch.Generator().manual_seed(seed)
    n = 2 * batch_per_site
    images = torch.randn(n, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    samples = [
        {"image": images[i], "label": int(labels[i]), "site": i // batch_per_site, "file": f"{i}.png"} for i in range(n)
    ]
    batch = collate_with_site_layout(samples)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def fast_path_switches(**switches: Any) -> Any:
    """A FastPath with every switch off unless given (what the tests of one switch start from)."""
    from covidct.training import FastPath

    off = {"gpu_tuning": False, "cuda_graph": False, "compile": False, "compile_mode": "default"}
    return FastPath(**{**off, **switches})
