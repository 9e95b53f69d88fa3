"""Methods of Table I, each a small LightningModule over `SiteMethod`."""

from covidct.methods.base import SiteMethod
from covidct.methods.joint import Joint
from covidct.methods.msnet import MSNet
from covidct.methods.ours import Ours, contrastive_loss
from covidct.methods.parallel_adapter import ParallelAdapter
from covidct.methods.sepnorm import SepNorm
from covidct.methods.series_adapter import SeriesAdapter
from covidct.methods.single import Single

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
]
