"""Parallel Adapter (Rebuffi et al., CVPR 2018): SepNorm plus a site 1x1 conv beside shared convs.

At every depthwise 3x3 and upper-branch conv: BN_site(conv_shared(x) + conv1x1_site(x)), same stride.
The backbone's `adapter: parallel` (conf/model/parallel_adapter.yaml) builds them (models/adapters.py).
"""

from __future__ import annotations

from covidct.methods.sepnorm import SepNorm


class ParallelAdapter(SepNorm):
    pass
