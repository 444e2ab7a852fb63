"""Figures, drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def save_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    size = max(4.5, 0.9 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=35)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray, path: Path,
                             title: str) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling (diagonal: calibrated)."""
    from tune_cells.analysis.calibration import expected_calibration_error, reliability_bins

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for probs, name, style in ((probs_before, "logits as trained", "o--"), (probs_after, "with temperature", "s-")):
        _, accuracy, confidence, _ = reliability_bins(probs, labels)
        ece = expected_calibration_error(probs, labels)
        shown = ~np.isnan(accuracy)
        ax.plot(confidence[shown], accuracy[shown], style, label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
