"""SepNorm + the contrastive cross-site objective of Wang, Liu, Dou (2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from covidct.methods.sepnorm import SepNorm
from covidct.models import projection_head
from covidct.models.routing import batch_sites


def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent with class labels, as the authors' `NTXentLoss(temperature=tau)`.

    For every ordered positive pair (m, n) (same class, m != n, either site):
    -log(exp(s_mn / tau) / (exp(s_mn / tau) + sum over negatives k of m of exp(s_mk / tau))),
    s = cosine similarity; other positives are not in the denominator. Averaged over positive
    pairs (the library's mean reduction, which alpha = 1 was tuned with); 0 without positive pairs.
    """
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / tau
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positive = same & ~eye
    negatives = logits.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)
    per_pair = F.softplus(negatives - logits)  # finite everywhere: a row without negatives gives 0
    # masked mean rather than boolean indexing: static shapes, no host sync
    return torch.where(positive, per_pair, 0.0).sum() / positive.sum().clamp_min(1)


class Ours(SepNorm):
    """Total loss = CE + alpha * contrastive; the projection H is trained by the contrastive term only."""

    def __init__(self, tau: float = 0.05, alpha: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.projection = projection_head(self.net.embedding_dim, num_sites=self.net.num_sites)

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sites = batch_sites(batch)
        embedding = self.net.features(batch["image"], sites)
        ce = F.cross_entropy(self.net.classify(embedding, sites), batch["label"])
        con = contrastive_loss(self.projection(embedding, sites), batch["label"], self.hparams.tau)
        return {"loss": ce + self.hparams.alpha * con, "ce": ce, "contrastive": con}
