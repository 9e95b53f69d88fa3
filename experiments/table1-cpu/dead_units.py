"""The diagnostic behind this folder's README note on COVID-Net: how alive a trained network's layers are.

    python experiments/table1-cpu/dead_units.py RUN/checkpoints/last.ckpt [...]

Feeds 16 random 64 px inputs (seed 0) through each checkpoint's network for its first site and prints, for the
input of every convolution inside the stages and every linear layer of the classifier (a sample of them), the
fraction of positive values, the largest magnitude and the per-feature std over the batch: a layer whose input is
0 for every unit and input has only dead ReLUs before it, and a network whose std falls to 0 answers every input
alike. Checkpoints are our own runs' (trusted); they are read with weights_only=False as covidct's loader does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from covidct.inference import _trained_method


def layer_inputs(checkpoint: Path) -> list[tuple[str, torch.Tensor]]:
    method = _trained_method(
        checkpoint, torch.load(checkpoint, map_location="cpu", weights_only=False), torch.device("cpu")
    )
    seen: list[tuple[str, torch.Tensor]] = []
    for name, module in method.named_modules():
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and "stages" in name):
            module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[0].detach())))
    torch.manual_seed(0)
    with torch.no_grad():
        method.logits(torch.randn(16, 3, 64, 64), torch.zeros(16, dtype=torch.long))
    return seen


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        inputs = layer_inputs(path)
        for name, values in inputs[:: max(1, len(inputs) // 8)] + inputs[-2:]:
            print(
                f"{path.parent.parent.parent.name}/{path.parent.parent.name} {name}: positive "
                f"{(values > 0).float().mean():.4f}, max {values.abs().max():.2e}, std over inputs "
                f"{values.std(0).mean():.2e}"
            )
