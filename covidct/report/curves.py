"""ROC curves (the paper's Fig. 3) and reliability diagrams per method and site, from pooled test predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_auroc, binary_roc  # noqa: E402


def roc_curve(labels: Sequence[int], probs: Sequence[float]) -> tuple[list[float], list[float], float]:
    """(false positive rates, true positive rates, AUC), computed as the run metrics are (torchmetrics)."""
    preds, target = torch.tensor(probs, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)
    fpr, tpr, _ = binary_roc(preds, target)
    return fpr.tolist(), tpr.tolist(), float(binary_auroc(preds, target))


def plot_rocs(curves: Mapping[str, tuple[list[float], list[float], float]], title: str, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    for label, (fpr, tpr, auc) in curves.items():
        axes.plot(fpr, tpr, lw=1.4, label=f"{label} (AUC {100 * auc:.1f})")
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})  # no version stamp: same records, same bytes
    plt.close(figure)
    return path


def plot_reliability(bins_by_method: Mapping[str, Sequence[Mapping[str, float]]], title: str, path: Path) -> Path:
    """Observed COVID fraction against mean predicted probability per bin; the diagonal is perfect calibration."""
    figure, axes = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    for label, bins in bins_by_method.items():
        axes.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], marker="o", ms=3, lw=1.2, label=label)
    axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    axes.set(
        xlabel="Mean predicted probability of COVID (per bin)",
        ylabel="Observed fraction of COVID images",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path
