"""Series Adapter (Rebuffi et al., NeurIPS 2017): SepNorm plus a site 1x1 adapter after shared convs.

At every depthwise 3x3 and upper-branch conv: BN_site(y + conv1x1_site(y)), y the shared conv's output.
The backbone's `adapter: series` (conf/model/series_adapter.yaml) builds them (models/adapters.py).
"""

from __future__ import annotations

from covidct.methods.sepnorm import SepNorm


class SeriesAdapter(SepNorm):
    pass
