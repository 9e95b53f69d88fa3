"""SepNorm: Joint with domain-specific BatchNorm (DSBN): every BN layer has one copy per site."""

from __future__ import annotations

from covidct.methods.joint import Joint


class SepNorm(Joint):
    norm_per_site = True
