"""Methods of Table I, each a small LightningModule over `SiteMethod`."""

from covidct.methods.base import SiteMethod
from covidct.methods.joint import Joint
from covidct.methods.ours import Ours, contrastive_loss
from covidct.methods.sepnorm import SepNorm
from covidct.methods.single import Single

__all__ = ["Joint", "Ours", "SepNorm", "Single", "SiteMethod", "contrastive_loss"]
