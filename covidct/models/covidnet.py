"""COVID-Net (Wang & Wong 2020) for CT, original or redesigned (Wang, Liu, Dou 2020), with site-routed norms.

Trunk: 7x7/2 conv (64) + max-pool, four stages of densely connected PEPX blocks at 56/28/14/7 px
(224 px input) with 256/512/1024/2048 channels and 3/4/6/3 blocks, and an upper branch of 1x1 convs
that carries the long skip connections (each stage's "shortcut"). Inside a stage, block j's input is
the shortcut plus all earlier block outputs; a stage's first block takes the sum of the previous
stage's max-pooled block outputs and shortcut. Stage 4's first block sums every stage-3 output (the
authors' code sums `pepx32` twice and omits `pepx33`; this is the intended wiring).

redesign=True: BN + ReLU after the first conv and each upper-branch conv (one BN per site when
num_sites > 1), global pooling to 2x2 (8192-d embedding at full width), BN + ReLU in the classifier.
redesign=False: the original, no BN, 7x7x2048 flattened into the classifier.
adapter="series"|"parallel": site adapters at every depthwise 3x3 and upper-branch conv (models/adapters.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covidct.models.adapters import AdaptedConv
from covidct.models.heads import SiteMLP, classifier_head
from covidct.models.norms import NormAct, SiteBatchNorm
from covidct.models.routing import Sites

STAGE_CHANNELS = (64, 256, 512, 1024, 2048)
STAGE_BLOCKS = (3, 4, 6, 3)
POOLED_GRID = 2


class PEPX(nn.Module):
    """Projection 1x1 -> expansion 1x1 -> depthwise 3x3 -> projection 1x1 -> extension 1x1; no BN, no activation.

    With adapters, the depthwise 3x3 gets a site-specific series or parallel 1x1 adapter followed by
    the site's BatchNorm (Rebuffi et al.'s adapters sit at the spatial convolutions).
    """

    def __init__(self, c_in: int, c_out: int, adapter: str = "none", num_sites: int = 1):
        super().__init__()
        half, three_quarters = c_in // 2, 3 * c_in // 4
        self.project_in = nn.Sequential(nn.Conv2d(c_in, half, 1), nn.Conv2d(half, three_quarters, 1))
        depthwise = nn.Conv2d(three_quarters, three_quarters, 3, padding=1, groups=three_quarters)
        self.depthwise = AdaptedConv(depthwise, adapter, num_sites)
        self.adapter_norm = SiteBatchNorm(three_quarters, num_sites) if adapter != "none" else None
        self.project_out = nn.Sequential(nn.Conv2d(three_quarters, half, 1), nn.Conv2d(half, c_out, 1))

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        x = self.depthwise(self.project_in(x), sites)
        if self.adapter_norm is not None:
            x = self.adapter_norm(x, sites)
        return self.project_out(x)


def _scaled(channels: int, width: float) -> int:
    """Width-multiplied channel count, kept a multiple of 4 so PEPX's c/2 and 3c/4 stay whole."""
    return max(4, round(channels * width / 4) * 4)


def _trunk_output_side(image_size: int) -> int:
    side = (image_size + 2 * 3 - 7) // 2 + 1  # 7x7/2 conv
    for _ in range(4):  # max-pool after the first conv and between the four stages
        side //= 2
    return side


class CovidNet(nn.Module):
    """Backbone plus classifier; `features` gives the pooled embedding that the projection head uses."""

    channels_last_input = False  # set with channels_last weights (covidct.training.FastPath)

    def __init__(
        self,
        redesign: bool = True,
        num_sites: int = 1,
        width: float = 1.0,
        image_size: int = 224,
        num_classes: int = 2,
        in_channels: int = 3,
        adapter: str = "none",
    ):
        super().__init__()
        if adapter != "none" and not redesign:
            raise ValueError("site adapters need the redesigned backbone (redesign=True)")
        self.redesign = redesign
        self.num_sites = num_sites
        ch = [_scaled(c, width) for c in STAGE_CHANNELS]

        def norm_act(c: int) -> NormAct:
            return NormAct(c, num_sites, norm=redesign, act=redesign)

        self.stem = nn.Conv2d(in_channels, ch[0], 7, stride=2, padding=3)
        self.stem_norm = norm_act(ch[0])
        self.upper = nn.ModuleList(AdaptedConv(nn.Conv2d(ch[k], ch[k + 1], 1), adapter, num_sites) for k in range(4))
        self.upper_norms = nn.ModuleList(norm_act(ch[k + 1]) for k in range(4))
        self.stages = nn.ModuleList(
            nn.ModuleList(PEPX(ch[k] if j == 0 else ch[k + 1], ch[k + 1], adapter, num_sites) for j in range(n))
            for k, n in enumerate(STAGE_BLOCKS)
        )
        if redesign:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(POOLED_GRID)
            self.embedding_dim = ch[4] * POOLED_GRID**2
        else:
            side = _trunk_output_side(image_size)
            if side < 1:
                raise ValueError(f"image_size {image_size} is too small for the original COVID-Net head")
            self.pool = nn.Identity()
            self.embedding_dim = ch[4] * side**2
        self.classifier: SiteMLP = classifier_head(self.embedding_dim, num_classes, num_sites, norm=redesign)

    def features(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        """Pooled, flattened embedding of the last PEPX block's output (as in the authors' code)."""
        if self.channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(self.stem_norm(self.stem(x), sites), 2)
        block_input = x
        shortcut = self.upper_norms[0](self.upper[0](x, sites), sites)
        for k, stage in enumerate(self.stages):
            last_stage = k + 1 == len(self.stages)
            # block j > 0 reads shortcut + outputs[0] + ... + outputs[j-1]: kept as a running sum rather than
            # re-summed per block (tests/test_models.py checks it against the dense definition)
            outputs: list[torch.Tensor] = []
            running = shortcut
            for j, block in enumerate(stage):
                outputs.append(block(block_input if j == 0 else running, sites))
                if not (last_stage and j + 1 == len(stage)):
                    running = running + outputs[-1]
            if not last_stage:
                next_shortcut = F.max_pool2d(self.upper_norms[k + 1](self.upper[k + 1](running, sites), sites), 2)
                pooled = [F.max_pool2d(t, 2) for t in [*outputs, shortcut]]
                block_input = sum(pooled[1:], start=pooled[0])
                shortcut = next_shortcut
        return torch.flatten(self.pool(outputs[-1]), 1)

    def classify(self, embedding: torch.Tensor, sites: Sites) -> torch.Tensor:
        return self.classifier(embedding, sites)

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        """Logits (no Sigmoid) for cross-entropy."""
        return self.classify(self.features(x, sites), sites)
