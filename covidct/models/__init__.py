"""Models: the COVID-Net backbone, site-routed norm layers and dense heads."""

from covidct.models.covidnet import CovidNet
from covidct.models.heads import SiteMLP, classifier_head, projection_head
from covidct.models.norms import NormAct, SiteBatchNorm

__all__ = ["CovidNet", "NormAct", "SiteBatchNorm", "SiteMLP", "classifier_head", "projection_head"]
