"""SepNorm: Joint with domain-specific BatchNorm (DSBN): every BN layer has one copy per site.

What makes it SepNorm is its backbone's `num_sites` (conf/model/sepnorm.yaml); the class names the row.
"""

from __future__ import annotations

from covidct.methods.joint import Joint


class SepNorm(Joint):
    pass
