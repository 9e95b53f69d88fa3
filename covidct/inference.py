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

from covidct.data.sources import load_image
from covidct.data.transforms import deterministic_resize, normalize_images, to_chw_uint8
from covidct.errors import ConfigError
from covidct.methods import SiteMethod, method_class
from covidct.models.routing import SiteBlocks
from covidct.models.unseen import UNSEEN_NORMS, add_unseen_site, estimate_unseen_statistics, has_site_copies
from covidct.resume import read_checkpoint

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
        self.image_size = int(data["image_size"])
        self.data_root = Path(str(data["root"])).expanduser()
        self.sites = tuple(self.method.sites)  # the data's sites it was trained on; batch site indices point here
        self.unseen: dict[str, str] = {}  # a site it never saw -> the layers it was given (models/unseen.py)
        self._resize = deterministic_resize("eval", self.image_size)
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])

    def check_site(self, site: str) -> int:
        """The site's index, if the model has a branch for it (trained, or given by add_unseen_site); an
        untrained one would give noise. A model without site-specific layers serves any site as it is."""
        if site in self.sites:
            return self.sites.index(site)
        if not has_site_copies(self.method):
            return 0
        raise ConfigError(
            f"{self.checkpoint} was trained for site(s) {', '.join(self.sites)} only, not site {site}, and its "
            f"norms are per site: choose site={' or site='.join(self.sites)}, or add unseen_norm="
            f"{'|'.join(UNSEEN_NORMS)} to evaluate {site} as a site it never saw."
        )

    def add_unseen_site(self, site: str, how: str, images: Iterable[torch.Tensor] = ()) -> int:
        """Give the model layers for `site`, which it never saw (models/unseen.py); `adabn` estimates their
        statistics on `images` (normalised batches of that site). Returns the number of images used."""
        if site in self.sites:
            raise ConfigError(f"site {site} is one the model was trained on: it needs no unseen_norm.")
        if not has_site_copies(self.method):
            return 0  # shared layers: nothing to choose
        index = add_unseen_site(self.method, how, self.sites)
        self.sites = (*self.sites, site)
        self.unseen[site] = how
        if how != "adabn":
            return 0
        route = SiteBlocks.single(index)
        return estimate_unseen_statistics(self.method, images, lambda batch: self.method.logits(batch, route))

    def load(self, path: Path) -> np.ndarray:
        """Decoded and resized HxWx3 uint8: what the evaluation cache holds for this image."""
        return self._resize(load_image(path))

    def batch(self, resized: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised NCHW float tensor on the model's device."""
        images = torch.from_numpy(np.stack([to_chw_uint8(image) for image in resized])).to(self.device)
        return normalize_images(images, self.mean, self.std)  # as the DataModule does after transfer

    def prob_covid(self, images: torch.Tensor, site: str) -> np.ndarray:
        """P(COVID) from the site's branch, computed as in the test step of training."""
        sites = SiteBlocks.single(self.check_site(site))
        with torch.inference_mode():
            return self.method.logits(images, sites).float().softmax(-1)[:, 1].cpu().numpy()
