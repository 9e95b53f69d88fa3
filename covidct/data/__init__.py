"""Data: site readers, folds, decode-once cache, transforms, the two-site DataModule, download."""

from covidct.data.datamodule import TwoSiteDataModule
from covidct.data.sources import SITES, Sample, scan_site

__all__ = ["SITES", "Sample", "TwoSiteDataModule", "scan_site"]
