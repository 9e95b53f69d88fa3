"""Gradient clipping per parameter group, shared by Lightning's loop and the captured step."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def clip_gradients(groups: Sequence[Sequence[nn.Parameter]], value: float | None, algorithm: str | None) -> None:
    """Clip each group's gradients in place, with no host sync; groups are clipped separately (Single's
    networks stay independent)."""
    if not value:
        return
    for group in groups:
        if algorithm == "value":
            nn.utils.clip_grad_value_(group, value)
        else:
            nn.utils.clip_grad_norm_(group, value)
