"""Data: site configs and readers, folds, decode-once cache, transforms, the site DataModule, download.

The DataModule is imported lazily so that `python -m covidct.data` starts without loading Lightning.
"""

from typing import Any

from covidct.data.sites import PAPER_SITES, SiteSpec, find_site
from covidct.data.sources import Sample, scan_site

__all__ = ["PAPER_SITES", "Sample", "SiteDataModule", "SiteSpec", "find_site", "scan_site"]


def __getattr__(name: str) -> Any:
    # TwoSiteDataModule: its name before it took N sites, as stored run configs and checkpoints name it
    if name in ("SiteDataModule", "TwoSiteDataModule"):
        from covidct.data.datamodule import SiteDataModule

        return SiteDataModule
    raise AttributeError(f"module 'covidct.data' has no attribute {name!r}")
