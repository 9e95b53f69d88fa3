"""ROC curves (the paper's Fig. 3) and reliability diagrams per method and site, from pooled test predictions.

Each figure keeps its legend beside the axes (eight methods' labels would hide the curves' corner) and says
under the axes what it pools (the caption), so a figure read on its own is not misread.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_auroc, binary_roc

from covidct.atomic import atomic_write

CAPTION_WIDTH = 150  # characters a caption line holds at its font size, on the figure's width


def roc_curve(labels: Sequence[int], probs: Sequence[float]) -> tuple[list[float], list[float], float]:
    """(false positive rates, true positive rates, AUC), computed as the run metrics are (torchmetrics)."""
    preds, target = torch.tensor(probs, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)
    fpr, tpr, _ = binary_roc(preds, target)
    return fpr.tolist(), tpr.tolist(), float(binary_auroc(preds, target))


def _figure(title: str, caption: str) -> tuple[Figure, Axes]:
    """Square axes with room to their right for the legend and under them for the caption; constrained
    layout places all three so none overlaps another or leaves the figure."""
    figure = Figure(figsize=(9.0, 6.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_box_aspect(1)
    axes.set_title(title, fontsize=10)
    if caption:  # as the figure's x super-label: constrained layout keeps room for it under the axes
        text = "\n".join(textwrap.fill(part, CAPTION_WIDTH) for part in caption.split("\n"))
        figure.supxlabel(text, x=0.02, ha="left", fontsize=8, color="0.25", linespacing=1.4)
    return figure, axes


def _legend(axes: Axes, title: str) -> None:
    axes.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize=8, title=title)


def save_figure(figure: Figure, path: Path) -> Path:
    """`figure` into `path` atomically (a kill leaves the old file or the new one), its format from the suffix and
    without a version stamp: the same records give the same bytes."""
    path = Path(path)
    atomic_write(path, lambda temp: figure.savefig(temp, format=path.suffix[1:], metadata={"Software": None}))
    return path


def roc_figure(curves: Mapping[str, tuple[list[float], list[float], float]], title: str, caption: str = "") -> Figure:
    """One ROC curve per method (label -> (fpr, tpr, auc)), the chance diagonal, the legend outside."""
    figure, axes = _figure(title, caption)
    for label, (fpr, tpr, auc) in curves.items():
        axes.plot(fpr, tpr, lw=1.4, label=f"{label}: {100 * auc:.1f}")
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance: 50.0")
    axes.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01))
    _legend(axes, "method: AUC (%)")
    return figure


def plot_rocs(
    curves: Mapping[str, tuple[list[float], list[float], float]], title: str, path: Path, caption: str = ""
) -> Path:
    return save_figure(roc_figure(curves, title, caption), path)


def reliability_figure(
    bins_by_method: Mapping[str, Sequence[Mapping[str, float]]], title: str, caption: str = ""
) -> Figure:
    """Observed COVID fraction against mean predicted probability per bin; the diagonal is perfect calibration."""
    figure, axes = _figure(title, caption)
    for label, bins in bins_by_method.items():
        axes.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], marker="o", ms=3, lw=1.2, label=label)
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    axes.set(
        xlabel="Mean predicted probability of COVID (per bin)",
        ylabel="Observed fraction of COVID images",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    _legend(axes, "method")
    return figure


def plot_reliability(
    bins_by_method: Mapping[str, Sequence[Mapping[str, float]]], title: str, path: Path, caption: str = ""
) -> Path:
    return save_figure(reliability_figure(bins_by_method, title, caption), path)


def learning_curve_figure(
    losses_by_method: Mapping[str, Sequence[Sequence[float]]], title: str, caption: str = ""
) -> Figure:
    """Each method's epoch-mean training loss: the mean over its runs (folds, seeds) as a line, each run faint
    beside it, so a run that diverged or stalled shows against its method's mean."""
    figure, axes = _figure(title, caption)
    for index, (label, runs) in enumerate(losses_by_method.items()):
        color = f"C{index % 10}"
        for losses in runs:
            axes.plot(range(1, len(losses) + 1), losses, color=color, lw=0.6, alpha=0.35)
        epochs = min(len(losses) for losses in runs)
        mean = [sum(losses[e] for losses in runs) / len(runs) for e in range(epochs)]
        axes.plot(range(1, epochs + 1), mean, color=color, lw=1.6, label=f"{label} ({len(runs)} runs)")
    axes.set(xlabel="Epoch", ylabel="Training loss (epoch mean, the loss each method optimises)")
    axes.set_ylim(bottom=0)
    _legend(axes, "method: mean over runs")
    return figure


def plot_learning_curves(
    losses_by_method: Mapping[str, Sequence[Sequence[float]]], title: str, path: Path, caption: str = ""
) -> Path:
    return save_figure(learning_curve_figure(losses_by_method, title, caption), path)
