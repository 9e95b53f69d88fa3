"""Methods of Table I, each a small LightningModule over `SiteMethod`."""

from pathlib import Path

from covidct.errors import ConfigError
from covidct.methods.base import SiteMethod
from covidct.methods.joint import Joint
from covidct.methods.msnet import MSNet
from covidct.methods.ours import Ours, contrastive_loss
from covidct.methods.parallel_adapter import ParallelAdapter
from covidct.methods.sepnorm import SepNorm
from covidct.methods.series_adapter import SeriesAdapter
from covidct.methods.single import Single
from covidct.resume import read_checkpoint

METHODS: dict[str, type[SiteMethod]] = {
    cls.__name__: cls for cls in (Single, Joint, SepNorm, SeriesAdapter, ParallelAdapter, MSNet, Ours)
}


def load_method(checkpoint_path: str | Path, map_location: str = "cpu") -> SiteMethod:
    """Rebuild the trained module of a covidct checkpoint, whatever its method, with its weights."""
    path = Path(checkpoint_path)
    identity = read_checkpoint(path).get("covidct") or {}
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
