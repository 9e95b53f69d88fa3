"""A trained covidct checkpoint, read once, for inference (`predict`, `explain`): its method with the trained
weights, and the preprocessing and sites it was trained with.

The preprocessing comes from the DataModule hyperparameters stored in the checkpoint, so a model is never fed
images sized or normalised differently from its evaluation during training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidct.data.sources import SITES, load_image, site_index
from covidct.data.transforms import deterministic_resize, normalize_images, to_chw_uint8
from covidct.errors import ConfigError
from covidct.methods import METHODS, SiteMethod
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


def method_class(identity: Mapping[str, Any]) -> type[SiteMethod] | None:
    """The class that wrote a checkpoint, from its covidct identity; None if unknown. The one place that
    maps a checkpoint to code."""
    return METHODS.get(identity.get("method", ""))


def _trained_method(path: Path, checkpoint: Mapping[str, Any], device: torch.device) -> SiteMethod:
    """The trained module of a read checkpoint (`path` names it in errors), in eval mode on `device`."""
    identity = checkpoint.get("covidct") or {}
    cls = method_class(identity)
    if cls is None:
        raise ConfigError(f"{path} is not a covidct checkpoint of a known method (found {identity or 'none'}).")
    method = cls(**checkpoint["hyper_parameters"])
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
        trained = [str(s) for s in data["sites"]]
        per_site_networks = getattr(self.method, "sites", None)
        self.sites = tuple(s for s in SITES if s in trained and (per_site_networks is None or s in per_site_networks))
        self._resize = deterministic_resize("eval", self.image_size)
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])

    def check_site(self, site: str) -> int:
        """The site's index, if the model has a trained branch for it; an untrained one would give noise."""
        index = site_index(site)
        if site not in self.sites:
            raise ConfigError(
                f"{self.checkpoint} was trained for site(s) {', '.join(self.sites)} only, not site {site}: "
                f"choose site={' or site='.join(self.sites)}."
            )
        return index

    def load(self, path: Path) -> np.ndarray:
        """Decoded and resized HxWx3 uint8: what the evaluation cache holds for this image."""
        return self._resize(load_image(path))

    def batch(self, resized: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised NCHW float tensor on the model's device."""
        images = torch.from_numpy(np.stack([to_chw_uint8(image) for image in resized])).to(self.device)
        return normalize_images(images, self.mean, self.std)  # as the DataModule does after transfer

    def prob_covid(self, images: torch.Tensor, site: str) -> np.ndarray:
        """P(COVID) from the site's branch, computed as in the test step of training."""
        site_tensor = torch.full((len(images),), self.check_site(site), dtype=torch.long, device=images.device)
        with torch.inference_mode():
            return self.method.logits(images, site_tensor).float().softmax(-1)[:, 1].cpu().numpy()
