"""One site's part of a federated run: a round of local training, and the final test, on its own images only.

A site trains the experiment's network (`model`) on its own fold of the data (`data.sites` narrowed to it, its
repeat factor kept), with Lightning, for `federated.local_epochs` epochs a round. Between rounds its whole state
(weights, optimizer, the loader's place) is a Lightning checkpoint in its own folder: what it keeps to itself
(the strategy's `local_keys`) never leaves it, and a rerun of a round starts from the same checkpoint. What it
sends is the rest of its weights; what it tests it reports as prediction rows, patients already pseudonymised
with its own key. With `federated.fraction_fit` below 1 a site sits some rounds out (covidct/federated/rounds.py):
it then goes on from the checkpoint of the last round it trained, its learning-rate schedule moved on by the
epochs it missed, so the schedule follows the federation's rounds, as at fraction 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from covidct.atomic import atomic_write
from covidct.checkpoints import read_checkpoint
from covidct.data.sources import patient_folders
from covidct.errors import DataError, TrainingIncomplete
from covidct.federated.rounds import rounds_trained
from covidct.federated.sharing import as_dtype
from covidct.federated.unseen import unseen_site_predictions
from covidct.pseudonyms import Pseudonyms
from covidct.training import DivergenceGuard
from covidct.training.fit import build, drop_optimizer_state, make_trainer


class GlobalWeights(pl.Callback):
    """Loads the server's weights once Lightning has restored the site's own checkpoint (which would otherwise
    overwrite them), and, with FedProx's mu > 0, adds the proximal term's gradient mu (w - w_global) to every
    shared parameter's gradient, before clipping and the optimizer step, as (mu / 2) ||w - w_global||^2 in the
    loss would."""

    def __init__(self, shared: Mapping[str, torch.Tensor], proximal_mu: float = 0.0):
        self.shared, self.proximal_mu = dict(shared), float(proximal_mu)
        self.anchors: dict[str, torch.Tensor] = {}
        self.first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_step = trainer.global_step
        state = pl_module.state_dict()
        for key, value in self.shared.items():
            state[key].copy_(as_dtype(value, state[key].dtype))
        if self.proximal_mu:
            parameters = dict(pl_module.named_parameters())
            self.anchors = {key: parameters[key].detach().clone() for key in self.shared if key in parameters}

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.anchors:
            return
        for key, parameter in pl_module.named_parameters():
            if key in self.anchors and parameter.grad is not None:
                parameter.grad.add_(parameter.detach() - self.anchors[key], alpha=self.proximal_mu)


class ScheduleCatchUp(pl.Callback):
    """Steps the learning-rate schedulers `epochs` times once Lightning has restored them: the epochs of the
    rounds a site sat out, where the federation's schedule moved on without it."""

    def __init__(self, epochs: int):
        self.epochs = int(epochs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with warnings.catch_warnings():  # a site's first round may be a late one: no optimizer step yet, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for config in trainer.lr_scheduler_configs:
                for _ in range(self.epochs):
                    config.scheduler.step()


def federated_epochs(cfg: DictConfig) -> DictConfig:
    """`cfg` with trainer.max_epochs the federation's epochs (rounds x local epochs): what a schedule over the
    run's epochs (the cosine's T_max) spans."""
    cfg, rounds = cfg.copy(), int(cfg.federated.rounds)  # resolved first: it may follow trainer.max_epochs
    with open_dict(cfg):
        cfg.federated.rounds = rounds
        cfg.trainer.max_epochs = rounds * int(cfg.federated.local_epochs)
    return cfg


class SiteClient:
    """One site of `cfg`'s federation, its state in `folder`."""

    def __init__(self, cfg: DictConfig, site: str, folder: Path, threads: int | None = None):
        self.cfg, self.site, self.folder = federated_epochs(cfg), site, Path(folder)
        if threads:  # torch's CPU threads: a number's last digits depend on them, so runtimes that agree agree
            torch.set_num_threads(threads)
        self.local_keys = get_class(cfg.federated.strategy._target_).local_keys  # what never leaves the site

    def report(self) -> dict[str, Any]:
        """What the site tells the server of its own data before the first round: its parts' counts and notes
        (split_summary), their fingerprint, its site file and how it names patients; a deployed server reads no
        data of its own."""
        datamodule = self._datamodule()
        datamodule.split_data()
        spec = datamodule.specs[self.site].as_dict()
        naming = {"patient_ids": self.cfg.patient_ids, "pseudonym_key_id": self.pseudonyms().key_id}
        return {"splits": datamodule.split_summary(), "fingerprint": datamodule.fingerprint(), "spec": spec, **naming}

    def pseudonyms(self) -> Pseudonyms:
        """How this site names its patients in what it sends (its own key, unless patient_ids=raw)."""
        return Pseudonyms(self.cfg.patient_ids, self.cfg.pseudonym_key)

    def checkpoint(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.ckpt"

    def last_trained(self, before_round: int) -> int:
        """The last round before `before_round` this site trained in (0: none)."""
        return (rounds_trained(self.cfg, self.site, before_round) or [0])[-1]

    def _keep_checkpoints(self, *rounds: int) -> None:
        """Delete the site's checkpoints of every round but `rounds`."""
        kept = {self.checkpoint(r).name for r in rounds}
        for path in self.folder.glob("round-*.ckpt"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def _final_state(self, server_round: int) -> dict[str, torch.Tensor]:
        """The site's weights after round `server_round`: its checkpoint of the last round it trained in (every
        training site trains in some round: covidct/federated/fit.py refuses a draw that leaves one out)."""
        return read_checkpoint(self.checkpoint(self.last_trained(server_round + 1)))["state_dict"]

    def _datamodule(self) -> Any:
        """The site's own data: its fold, or, for a site that only tests (data.test_sites), all its images."""
        if self.site in [str(site) for site in self.cfg.data.test_sites or []]:
            return build(self.cfg.data, sites=[], test_sites=[self.site], _convert_="all")
        return build(self.cfg.data, sites=[self.site], test_sites=[], _convert_="all")

    def model(self) -> Any:
        """The site's network as it starts: the experiment's, at the run's seed, so every site (and the server's
        first weights) begin alike."""
        pl.seed_everything(self.cfg.seed, workers=True)
        return build(self.cfg.model, sites=[self.site], _convert_="all")

    def shared_part(self, model: pl.LightningModule) -> dict[str, torch.Tensor]:
        local = self.local_keys(model)
        return {key: value.detach().cpu() for key, value in model.state_dict().items() if key not in local}

    def _received(self, model: pl.LightningModule, shared: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server's weights this site takes: its own keys only, never one it keeps to itself (a server
        sending BatchNorms to a FedBN site would otherwise overwrite them)."""
        mine, local = model.state_dict(), self.local_keys(model)
        unknown = sorted(set(shared) - set(mine))
        if unknown:
            raise DataError(f"the server sent weights this site's network lacks ({', '.join(unknown[:3])}, ...).")
        return {key: value for key, value in shared.items() if key not in local}

    def train_round(
        self, server_round: int, shared: Mapping[str, torch.Tensor], proximal_mu: float = 0.0
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Round `server_round` (from 1): from the site's checkpoint of the last round it trained in and the
        server's weights, `local_epochs` epochs on its images; returns what it shares and its metrics (the images it
        trained on, which weight its share, and its mean training loss)."""
        datamodule = self._datamodule()
        datamodule.setup("fit")
        model = self.model()
        pl.seed_everything(self.cfg.seed + server_round, workers=True)
        epochs = int(self.cfg.federated.local_epochs)
        if server_round not in rounds_trained(self.cfg, self.site, server_round + 1):
            raise TrainingIncomplete(
                f"the server sent site {self.site} round {server_round}, which the run's draw (seed "
                f"{self.cfg.seed}, federated.fraction_fit={self.cfg.federated.fraction_fit}) gives to other sites: the "
                "server and this site run different covidct versions; install the server's."
            )
        trained = rounds_trained(self.cfg, self.site, server_round)
        last = trained[-1] if trained else 0
        weights = GlobalWeights(self._received(model, shared), proximal_mu)
        trainer = make_trainer(
            self.cfg,
            max_epochs=(len(trained) + 1) * epochs,  # the site's own epochs; the schedule's place is the federation's
            logger=False,
            callbacks=[weights, ScheduleCatchUp((server_round - 1 - last) * epochs), DivergenceGuard()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            default_root_dir=str(self.folder),
        )
        before = self.checkpoint(last)
        if last and not before.is_file():
            raise TrainingIncomplete(
                f"site {self.site} has no checkpoint of round {last} in {self.folder}: it cannot go on "
                "from where the federation is (was its state folder moved or emptied?)."
            )
        trainer.fit(model, datamodule=datamodule, ckpt_path=before if last else None, weights_only=True)
        steps = trainer.global_step - weights.first_step
        atomic_write(self.checkpoint(server_round), trainer.save_checkpoint)
        self._keep_checkpoints(last, server_round)  # the one before stays: a rerun of this round starts from it
        metrics = {  # FedAvg's weight: the site's size, its training images (McMahan et al.'s n_k)
            "num-examples": float(len(datamodule.splits[self.site]["train"])),
            "images_trained": float(steps * int(self.cfg.data.batch_per_site)),
            "train_loss": float(trainer.callback_metrics["train/loss_epoch"]),
        }
        return self.shared_part(model), metrics

    def kept_part(self, server_round: int) -> dict[str, torch.Tensor]:
        """What the site kept to itself of its weights after round `server_round` (only a site that never trained,
        in a leave-one-site-out run, is sent it: covidct/federated/unseen.py)."""
        state, local = self._final_state(server_round), self.local_keys(self.model())
        return {key: value for key, value in state.items() if key in local}

    def test(self, server_round: int, shared: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """The site's test part classified by its final model (the server's weights and its own), as prediction
        rows whose patients are pseudonyms of the site's key (unless patient_ids=raw)."""
        datamodule = self._datamodule()
        model = self.model()
        state = self._final_state(server_round)
        received = self._received(model, shared)
        model.load_state_dict({**state, **{key: as_dtype(value, state[key].dtype) for key, value in received.items()}})
        trainer = make_trainer(self.cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        model.test_log_prefix = "test"
        trainer.test(model, datamodule=datamodule, verbose=False, weights_only=True)
        patients = datamodule.test_patients()
        rows = [{**p, "patient": patients.get((p["site"], p["file"]), "")} for p in model.test_predictions]
        self._keep_checkpoints(self.last_trained(server_round + 1))  # finished: the last trained weights stay
        if not self.cfg.keep_optimizer_state:
            drop_optimizer_state(self.folder)
        return self.shown(rows, datamodule)

    def test_unseen(
        self, trained: list[str], shared: Mapping[str, torch.Tensor], kept: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> list[dict[str, Any]]:
        """This site never trained: every image of it classified by the federation's final weights, under each norm
        choice the strategy leaves it, as prediction rows (covidct/federated/unseen.py)."""
        datamodule = self._datamodule()
        rows = unseen_site_predictions(self.cfg, datamodule, self.site, trained, shared, kept, self.local_keys)
        return self.shown(rows, datamodule)

    def shown(self, rows: list[dict[str, Any]], datamodule: Any) -> list[dict[str, Any]]:
        """Prediction rows as they leave the site: patients (and folders named by them) as pseudonyms of the site's
        own key, unless patient_ids=raw."""
        folders: dict[str, set[str]] = {}
        for row in rows:
            folders.setdefault(row["patient"], set()).update(patient_folders(datamodule.specs[self.site], row["file"]))
        return self.pseudonyms().rows(rows, folders)
