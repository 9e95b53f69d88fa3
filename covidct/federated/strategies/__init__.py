"""The federated strategies, one a file: each is a Flower strategy and says what stays at a site."""

from covidct.federated.strategies.base import SiteStrategy
from covidct.federated.strategies.fedavg import FedAvg
from covidct.federated.strategies.fedbn import FedBN
from covidct.federated.strategies.fedprox import FedProx
from covidct.federated.strategies.local import Local
from covidct.federated.strategies.silobn import SiloBN

__all__ = ["FedAvg", "FedBN", "FedProx", "Local", "SiloBN", "SiteStrategy"]
