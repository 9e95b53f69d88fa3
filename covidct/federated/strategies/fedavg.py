"""FedAvg (McMahan et al. 2017): every weight and BatchNorm statistic shared, averaged by the images each site
trained on in the round (its site size under the data budget: site B's 4 passes count 4 times)."""

from __future__ import annotations

from flwr.serverapp import strategy

from covidct.federated.strategies.base import SiteStrategy


class FedAvg(SiteStrategy, strategy.FedAvg):
    pass
