"""MS-Net (Liu, Dou et al., IEEE TMI 2020) adapted from segmentation to classification.

Shared encoder with site-specific BN (as SepNorm); one auxiliary classifier per site, trained on its own
site's images only; a universal classifier (the one tested) trained on all sites with
(1 - kt_weight) * CE(labels) + kt_weight * CE(the own site's auxiliary hard prediction), the
knowledge-transfer term switched on after `kt_warmup_epochs` and passing no gradient into the
auxiliary heads. The auxiliary heads' supervised losses train the shared encoder too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidct.methods.sepnorm import SepNorm
from covidct.models import classifier_head
from covidct.models.routing import SiteBlocks, batch_sites, site_rows


class MSNet(SepNorm):
    def __init__(self, kt_weight: float = 0.5, kt_warmup_epochs: int = 10, **kwargs: Any):
        super().__init__(**kwargs)
        self.aux_heads = nn.ModuleList(classifier_head(self.net.embedding_dim, num_sites=1) for _ in self.sites)
        # the transfer term's weight: 0 during warm-up; a buffer, so a captured step reads its current value
        self.register_buffer("transfer_weight", torch.tensor(self._transfer_weight(0)), persistent=False)

    def _transfer_weight(self, epoch: int) -> float:
        return float(self.hparams.kt_weight) if epoch >= self.hparams.kt_warmup_epochs else 0.0

    def on_train_start(self) -> None:  # also here: a run resumed mid-epoch skips that epoch's start
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        self.transfer_weight.fill_(self._transfer_weight(self.current_epoch))

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sites, label = batch_sites(batch), batch["label"]
        embedding = self.net.features(batch["image"], sites)
        losses: dict[str, torch.Tensor] = {}
        aux_prediction = torch.empty_like(label)
        for s, rows in site_rows(sites, len(label)):
            aux_logits = self.aux_heads[s](embedding[rows], SiteBlocks.single(0))  # one head per site
            losses[f"aux_{self.sites[s]}"] = F.cross_entropy(aux_logits, label[rows])
            aux_prediction[rows] = aux_logits.detach().argmax(dim=1)
        universal_logits = self.net.classify(embedding, sites)
        supervised = F.cross_entropy(universal_logits, label)
        transfer = F.cross_entropy(universal_logits, aux_prediction)
        weight = self.transfer_weight
        universal = (1 - weight) * supervised + weight * transfer
        return {"loss": universal + sum(losses.values()), "ce": supervised, "transfer": transfer, **losses}
