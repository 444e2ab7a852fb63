"""Figures, drawn on matplotlib `Figure` objects (no pyplot: no backend chosen for the process
that imports this, no global figure registry to leak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay


def save_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    size = max(4.5, 0.9 * len(classes) + 2.5)
    fig = Figure(figsize=(size, size), dpi=120)
    ax = fig.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=35)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def save_reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray, path: Path,
                             title: str) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling (diagonal: calibrated)."""
    from tune_cells.analysis.calibration import expected_calibration_error, reliability_bins

    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.subplots()
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
    return Path(path)
