"""FedAvg (McMahan et al. 2017): every weight and BatchNorm statistic shared, averaged by each site's size, its
training images (McMahan et al.'s n_k: site B's 4 passes an epoch count once)."""

from __future__ import annotations

from flwr.serverapp import strategy

from covidct.federated.strategies.base import SiteStrategy


class FedAvg(SiteStrategy, strategy.FedAvg):
    pass
