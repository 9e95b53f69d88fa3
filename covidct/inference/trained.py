"""A trained covidct checkpoint, read once, for inference (`predict`, `explain`): its method with the trained
weights, and the preprocessing and sites it was trained with.

The preprocessing comes from the DataModule hyperparameters stored in the checkpoint, so a model is never fed
images sized or normalised differently from its evaluation during training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidct.checkpoints import read_checkpoint
from covidct.data.dicom import LUNG_WINDOW
from covidct.data.sites import SiteSpec, find_site, split_sites
from covidct.data.sources import load_image
from covidct.data.transforms import deterministic_resize, normalize_images, to_chw_uint8
from covidct.errors import ConfigError
from covidct.methods import SiteMethod, method_class
from covidct.models.routing import SiteBlocks
from covidct.models.unseen import UNSEEN_NORMS, has_site_copies, unseen_choices, unseen_site_model

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA GPU is visible; use device=cpu or device=auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _trained_method(path: Path, checkpoint: Mapping[str, Any], device: torch.device) -> SiteMethod:
    """The trained module of a read checkpoint (`path` names it in errors), in eval mode on `device`."""
    identity = checkpoint.get("covidct") or {}
    if not identity:
        raise ConfigError(f"{path} is not a covidct checkpoint (it holds no covidct identity).")
    if "." not in str(identity.get("method", "")):  # a class path (module.Class); older ones named the class
        raise ConfigError(
            f"{path} predates checkpoints that name their method's class ({identity.get('method')!r}); "
            "retrain it with this version."
        )
    method = method_class(identity["method"])(**checkpoint["hyper_parameters"])
    method.load_state_dict(checkpoint["state_dict"])
    return method.to(device).eval()


def stored_sites(data: Mapping[str, Any]) -> list[SiteSpec]:
    """The sites a checkpoint's data settings name, from the specs it stores (older checkpoints store none:
    their sites are the paper's, read from conf/)."""
    trained, held = split_sites(list(data.get("sites", ())), list(data.get("test_sites", ())), data.get("site_specs"))
    return [*trained, *held]


def selection_of(checkpoint: Path) -> str:
    """Which of a run's test selections a checkpoint file is: 'best_val_auc' (best-*.ckpt) or 'last'."""
    return "best_val_auc" if Path(checkpoint).name.startswith("best-") else "last"


class TrainedModel:
    """A checkpoint's method together with the preprocessing and sites it was trained with."""

    def __init__(self, ckpt: str | Path, device: str = "auto"):
        self.device = resolve_device(device)
        self.checkpoint = Path(ckpt)
        checkpoint = read_checkpoint(self.checkpoint)
        self.method = _trained_method(self.checkpoint, checkpoint, self.device)
        data = checkpoint.get("datamodule_hyper_parameters")
        if not data:
            raise ConfigError(
                f"{self.checkpoint} holds no data settings (datamodule_hyper_parameters), so its image size and "
                "normalisation are unknown; it predates their recording. Retrain it with the current code."
            )
        self.specs = {spec.name: spec for spec in stored_sites(data)}  # every site of its data, unseen ones too
        self.data = dict(data)  # the DataModule's settings: folds, grouping, preprocessing
        self.image_size = int(data["image_size"])
        self.data_root = Path(str(data["root"])).expanduser()
        self.sites = tuple(self.method.sites)  # the data's sites it was trained on; batch site indices point here
        self.unseen: dict[str, str] = {}  # a site it never saw -> the layers it was given (models/unseen.py)
        self._borrowed: dict[str, int] = {}  # such a site -> the trained site whose network it uses (Single)
        self._resize = deterministic_resize("eval", self.image_size)
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])

    def site_name(self, site: str) -> str:
        """A site's name as the model knows it: `site`, or the site it is an alias of (covid_ct: B)."""
        return next((spec.name for spec in self.specs.values() if site in spec.aliases), site)

    def window(self, site: str) -> tuple[float, float]:
        """The DICOM window of a site: as in training for the checkpoint's own sites, else its site file's
        (conf/data/site/), else the lung window."""
        if site in self.specs:
            return self.specs[site].window
        try:
            return find_site(site).window
        except ConfigError:
            return LUNG_WINDOW

    def check_site(self, site: str) -> int:
        """The site's index, if the model has a branch for it (trained, or given by add_unseen_site); an
        untrained one would give noise. A model whose layers all sites share serves any site as it is."""
        if site in self.sites:
            return self.sites.index(site)
        if site in self._borrowed:
            return self._borrowed[site]
        if self._serves_any_site():
            return 0
        trained = ", ".join(self.method.sites)
        choices = "site:<name>" if self.method.networks_per_site else "|".join(UNSEEN_NORMS)
        raise ConfigError(
            f"{self.checkpoint} was trained for site(s) {trained} only, not site {site}, and its "
            f"{'networks are' if self.method.networks_per_site else 'norms are'} per site: choose "
            f"site={' or site='.join(self.method.sites)}, or add unseen_norm={choices} to evaluate {site} as a "
            "site it never saw."
        )

    def _serves_any_site(self) -> bool:
        if self.method.networks_per_site:
            return len(self.method.sites) == 1  # its one network
        return not has_site_copies(self.method)

    def unseen_note(self, site: str) -> str | None:
        """What a site outside the training sites is classified with, in words (None for a trained site)."""
        if site in self.method.sites:
            return None
        if site in self.unseen:
            return f"unseen_norm={self.unseen[site]}"
        if self.method.networks_per_site:
            return f"its one network, trained on site {self.method.sites[0]}, classifies it"
        if len(self.method.sites) == 1:
            return f"the layers of its one training site, {self.method.sites[0]}, classify it (or: unseen_norm=adabn)"
        return "its layers are shared by all sites, so it is classified as it is"

    def add_unseen_site(self, site: str, how: str, images: Iterable[torch.Tensor] = ()) -> int:
        """Give the model layers for `site`, which it never saw (models/unseen.py); `adabn` estimates their
        statistics on `images` (normalised batches of that site). Returns the number of images used."""
        if site in self.sites:
            raise ConfigError(f"site {site} is one the model was trained on: it needs no unseen_norm.")
        if self._serves_any_site() and not (how == "adabn" and "adabn" in unseen_choices(self.method)):
            return 0  # nothing to choose (with one training site, adabn still re-estimates its BatchNorms)
        if self.method.networks_per_site:
            name = how.split(":", 1)[1] if how.startswith("site:") else None
            if name not in self.method.sites:
                raise ConfigError(
                    f"{type(self.method).__name__} keeps one network per site, so a site it never saw can only "
                    f"borrow one: unseen_norm=site:<{'|'.join(self.method.sites)}>, not {how!r}."
                )
        _, index, seen = unseen_site_model(self.method, how, lambda: images, in_place=True)
        if self.method.networks_per_site:
            self._borrowed[site] = index
        else:
            self.sites = (*self.sites, site)
        self.unseen[site] = how
        return seen

    def load(self, path: Path, ct_window: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
        """Decoded and resized HxWx3 uint8: what the evaluation cache holds for this image."""
        return self._resize(load_image(path, ct_window))

    def batch(self, resized: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised NCHW float tensor on the model's device."""
        images = torch.from_numpy(np.stack([to_chw_uint8(image) for image in resized])).to(self.device)
        return normalize_images(images, self.mean, self.std)  # as the DataModule does after transfer

    def prob_covid(self, images: torch.Tensor, site: str) -> np.ndarray:
        """P(COVID) from the site's branch, computed as in the test step of training."""
        sites = SiteBlocks.single(self.check_site(site))
        with torch.inference_mode():
            return self.method.prob_covid(images, sites).cpu().numpy()
