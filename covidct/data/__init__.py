"""Data: site readers, folds, decode-once cache, transforms, the two-site DataModule, download.

The DataModule is imported lazily so that `python -m covidct.data` starts without loading Lightning.
"""

from typing import Any

from covidct.data.sources import SITES, Sample, scan_site

__all__ = ["SITES", "Sample", "TwoSiteDataModule", "scan_site"]


def __getattr__(name: str) -> Any:
    if name == "TwoSiteDataModule":
        from covidct.data.datamodule import TwoSiteDataModule

        return TwoSiteDataModule
    raise AttributeError(f"module 'covidct.data' has no attribute {name!r}")
