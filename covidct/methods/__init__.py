"""Methods of Table I, each a small LightningModule over `SiteMethod`.

A method is found by the class path its checkpoints store (`SiteMethod.checkpoint_identity`) and its
experiment's `model._target_`: a new method needs its file and an experiment YAML, no list to edit.
"""

from hydra.utils import get_class

from covidct.errors import ConfigError
from covidct.methods.base import SiteMethod, method_path
from covidct.methods.joint import Joint
from covidct.methods.msnet import MSNet
from covidct.methods.ours import Ours, contrastive_loss
from covidct.methods.parallel_adapter import ParallelAdapter
from covidct.methods.sepnorm import SepNorm
from covidct.methods.series_adapter import SeriesAdapter
from covidct.methods.single import Single


def method_class(path: str) -> type[SiteMethod]:
    """The method class at `path` (module.Class), or a clear error naming what was found."""
    try:
        cls = get_class(path)
    except Exception as err:  # hydra wraps import and attribute errors alike
        raise ConfigError(f"method {path!r} cannot be imported ({err}).") from None
    if not (isinstance(cls, type) and issubclass(cls, SiteMethod)):
        raise ConfigError(f"{path!r} is not a covidct method (a subclass of covidct.methods.SiteMethod).")
    return cls


__all__ = [
    "Joint",
    "MSNet",
    "Ours",
    "ParallelAdapter",
    "SepNorm",
    "SeriesAdapter",
    "Single",
    "SiteMethod",
    "contrastive_loss",
    "method_class",
    "method_path",
]
