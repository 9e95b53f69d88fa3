"""Methods of Table I, each a small LightningModule over `SiteMethod`."""

from pathlib import Path

import torch

from covidct.errors import ConfigError, DataError
from covidct.methods.base import SiteMethod
from covidct.methods.joint import Joint
from covidct.methods.msnet import MSNet
from covidct.methods.ours import Ours, contrastive_loss
from covidct.methods.parallel_adapter import ParallelAdapter
from covidct.methods.sepnorm import SepNorm
from covidct.methods.series_adapter import SeriesAdapter
from covidct.methods.single import Single

METHODS: dict[str, type[SiteMethod]] = {
    cls.__name__: cls for cls in (Single, Joint, SepNorm, SeriesAdapter, ParallelAdapter, MSNet, Ours)
}


def load_method(checkpoint_path: str | Path, map_location: str = "cpu") -> SiteMethod:
    """Rebuild the trained module of a covidct checkpoint, whatever its method, with its weights."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise DataError(f"checkpoint {path} cannot be read ({err}).") from err
    identity = checkpoint.get("covidct") or {}
    method = METHODS.get(identity.get("method", ""))
    if method is None:
        raise ConfigError(f"{path} is not a covidct checkpoint of a known method (found {identity or 'none'}).")
    return method.load_from_checkpoint(path, map_location=map_location).eval()


__all__ = [
    "METHODS",
    "load_method",
    "Joint",
    "MSNet",
    "Ours",
    "ParallelAdapter",
    "SepNorm",
    "SeriesAdapter",
    "Single",
    "SiteMethod",
    "contrastive_loss",
]
