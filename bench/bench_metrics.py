"""The bootstrap of a classification evaluation: tune-cells' NumPy metrics against scikit-learn's
(the code before session 29, kept here as the reference), on the same predictions, side by side.

    .venv/bin/python bench/bench_metrics.py [--images 27 513] [--classes 2 8] [--boot 1000]

For each test-set size and class count: the seconds of `bootstrap_intervals` with each, their ratio,
and the largest difference between the two sets of intervals (0 up to rounding: same resamples,
same metrics). The arms run one after the other, never at once.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sklearn
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from tune_cells.analysis import metrics


def sklearn_metrics(y_true, probs, classes, present=None) -> dict[str, float]:
    """classification_metrics as it was: scikit-learn's functions."""
    labels = list(range(len(classes)))
    present = sorted(set(np.unique(y_true).tolist())) if present is None else present
    y_pred = probs.argmax(1)
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    scores = {"test_accuracy": accuracy_score(y_true, y_pred), "test_balanced_accuracy": np.mean(recall[present]),
              "test_macro_f1": np.mean(f1[present])}
    if len(np.unique(y_true)) == len(labels):
        scores["test_roc_auc"] = (roc_auc_score(y_true, probs[:, 1]) if len(labels) == 2 else
                                  roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    for i, name in enumerate(classes):
        if i in present:
            safe = metrics.metric_safe(name)
            scores |= {f"test_f1_{safe}": f1[i], f"test_precision_{safe}": precision[i],
                       f"test_recall_{safe}": recall[i]}
    return {k: float(v) for k, v in scores.items()}


def predictions(n: int, n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 2.0
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def timed_intervals(y, probs, classes, n_boot: int, reference: bool):
    own = metrics.classification_metrics
    if reference:
        metrics.classification_metrics = sklearn_metrics  # what bootstrap_intervals calls, for this arm only
    try:
        started = time.perf_counter()
        # (before: the resamples ran with sklearn's parameter validation off, as here)
        with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
            intervals = metrics.bootstrap_intervals(y, probs, classes, n_boot=n_boot)
        return time.perf_counter() - started, intervals
    finally:
        metrics.classification_metrics = own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[27, 513])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args()
    print(f"{'images':>6} {'classes':>7} {'scikit-learn s':>15} {'NumPy s':>8} {'ratio':>6} {'max |diff|':>11}")
    for n in args.images:
        for k in args.classes:
            y, probs = predictions(n, k)
            classes = [f"c{i}" for i in range(k)]
            before, reference = timed_intervals(y, probs, classes, args.boot, reference=True)
            after, ours = timed_intervals(y, probs, classes, args.boot, reference=False)
            assert reference.keys() == ours.keys()
            diff = max(abs(a - b) for key in ours for a, b in zip(ours[key], reference[key]))
            print(f"{n:>6} {k:>7} {before:>15.2f} {after:>8.2f} {before / after:>6.1f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
