"""Data: site configs and readers, folds, decode-once cache, transforms, the two-site DataModule, download.

The DataModule is imported lazily so that `python -m covidct.data` starts without loading Lightning.
"""

from typing import Any

from covidct.data.sites import PAPER_SITES, SiteSpec, find_site
from covidct.data.sources import Sample, scan_site

__all__ = ["PAPER_SITES", "Sample", "SiteSpec", "TwoSiteDataModule", "find_site", "scan_site"]


def __getattr__(name: str) -> Any:
    if name == "TwoSiteDataModule":
        from covidct.data.datamodule import TwoSiteDataModule

        return TwoSiteDataModule
    raise AttributeError(f"module 'covidct.data' has no attribute {name!r}")
