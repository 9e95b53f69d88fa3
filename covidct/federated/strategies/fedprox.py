"""FedProx (Li et al. 2020): FedAvg whose sites add (mu / 2) ||w - w_global||^2 to their loss (Flower sends mu as
`proximal-mu`; covidct/federated/client.py adds the term's gradient); mu = 0 is FedAvg."""

from __future__ import annotations

from flwr.serverapp import strategy

from covidct.federated.strategies.base import SiteStrategy


class FedProx(SiteStrategy, strategy.FedProx):
    pass
