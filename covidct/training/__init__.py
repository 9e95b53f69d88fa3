"""Training-loop machinery that attaches to any method through Lightning's own extension points: the fast
path (switches and the captured step) and the divergence guard."""

from covidct.training.captured import CapturedStep
from covidct.training.clipping import clip_gradients
from covidct.training.divergence import DivergenceGuard
from covidct.training.fast_path import FastPath

__all__ = ["CapturedStep", "DivergenceGuard", "FastPath", "clip_gradients"]
