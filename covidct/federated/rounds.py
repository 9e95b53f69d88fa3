"""Which sites take part in which round: the sites of a federation, and those `federated.fraction_fit` draws to
train in each round.

The draw is a pure function of the run's seed, the round and the sites' names (a SHA-256 ranking: the same in
every process and every Python version), so the server (choosing whom to send a round) and each site (finding
the rounds it sat out, and so the checkpoint and the point of the learning-rate schedule it resumes from) agree
without a message, and a resumed run draws as the uninterrupted one did. Flower's own sampling cannot serve: it
draws from Python's unseeded generator, over every connected node, sites that only test included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from omegaconf import DictConfig

from covidct.data.sites import split_sites


def federation_sites(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """The sites that train (data.sites without data.test_sites) and those that only test the final model. Deployed,
    the sites' files are theirs: the names as given."""
    sites, held = [str(site) for site in cfg.data.sites], [str(site) for site in cfg.data.test_sites or []]
    if cfg.federated.runtime == "deployment":
        return [site for site in sites if site not in held], held
    trained, unseen = split_sites(sites, held, cfg.data.get("site_specs"))
    return [spec.name for spec in trained], [spec.name for spec in unseen]


def sampled_sites(sites: Sequence[str], fraction: float, seed: int, server_round: int) -> list[str]:
    """The sites that train in round `server_round` (from 1), sorted: every one at fraction 1, else the
    max(1, int(len(sites) * fraction)) whose SHA-256 of (seed, round, name) ranks first."""
    ordered = sorted(sites)
    count = max(1, int(len(ordered) * fraction))
    if count >= len(ordered):
        return ordered

    def rank(site: str) -> bytes:
        return hashlib.sha256(f"covidct-round/{seed}/{server_round}/{site}".encode()).digest()

    return sorted(sorted(ordered, key=rank)[:count])


def rounds_trained(cfg: DictConfig, site: str, before_round: int) -> list[int]:
    """The rounds before `before_round` in which `site` of `cfg`'s federation trains."""
    trained, _ = federation_sites(cfg)
    fraction, seed = float(cfg.federated.fraction_fit), int(cfg.seed)
    return [r for r in range(1, before_round) if site in sampled_sites(trained, fraction, seed, r)]


def never_drawn(cfg: DictConfig) -> list[str]:
    """The training sites no round of `cfg`'s federation draws (their networks would be tested untrained)."""
    trained, _ = federation_sites(cfg)
    rounds = int(cfg.federated.rounds) + 1
    return [site for site in trained if not rounds_trained(cfg, site, rounds)]
