"""Classification test metrics with percentile-bootstrap 95 % confidence intervals.

Computed from class counts and ranks with NumPy, as scikit-learn defines them (tests/test_metrics.py
checks them against it): a bootstrap scores 1,000 resamples, and scikit-learn's per-call checks made
that most of an evaluation's time (bench/bench_metrics.py prints both side by side)."""

from __future__ import annotations

import re

import numpy as np
from scipy.stats import rankdata


def metric_safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-.]", "_", name)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           present: list[int] | None = None) -> dict[str, float]:
    """test_* metrics of one set of predictions; ROC AUC is one-vs-rest macro (binary: positive class).

    Per-class and macro scores cover the classes `present` in the evaluated set (default: those in
    `y_true`): an external set without some class says nothing about it, and a 0 there would be a lie.
    """
    labels = list(range(len(classes)))
    present = sorted(set(np.unique(y_true).tolist())) if present is None else present
    y_pred = probs.argmax(1)
    precision, recall, f1 = per_class_scores(y_true, y_pred, len(labels))
    metrics = {
        "test_accuracy": float(np.mean(y_true == y_pred)),
        # Balanced accuracy is the mean per-class recall: the HEp-2 contest's "mean class accuracy".
        "test_balanced_accuracy": float(np.mean(recall[present])),
        "test_macro_f1": float(np.mean(f1[present])),
    }
    auc = _roc_auc(y_true, probs, labels)
    if auc is not None:
        metrics["test_roc_auc"] = auc
    for i, name in enumerate(classes):
        if i not in present:
            continue
        safe = metric_safe(name)
        metrics[f"test_f1_{safe}"] = f1[i]
        metrics[f"test_precision_{safe}"] = precision[i]
        metrics[f"test_recall_{safe}"] = recall[i]
    return {k: float(v) for k, v in metrics.items()}


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, ...]:
    """(precision, recall, F1) of each class, 0 where undefined (scikit-learn's zero_division=0)."""
    true_sum = np.bincount(y_true, minlength=n_classes)
    pred_sum = np.bincount(y_pred, minlength=n_classes)
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    return _divide(tp, pred_sum), _divide(tp, true_sum), _divide(2.0 * tp, true_sum + pred_sum)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _roc_auc(y_true, probs, labels) -> float | None:
    """Binary: of the positive class's probability; more classes: the unweighted mean of each
    class's one-vs-rest AUC (scikit-learn's multi_class="ovr", average="macro")."""
    if len(np.unique(y_true)) < len(labels):
        return None  # undefined when a class is absent from the sample
    if len(labels) == 2:
        return _binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([_binary_auc(y_true == k, probs[:, k]) for k in labels]))


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """The area under the ROC curve as the Mann-Whitney statistic: the chance that a positive
    scores above a negative, ties counted half (the trapezoidal area scikit-learn computes)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(score)  # ties: their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


MIN_GROUPS_FOR_CI = 5  # fewer groups than this in the test part: no bootstrap CI, a note instead


def bootstrap_units(groups) -> list[np.ndarray] | None:
    """The row indices of each group (`groups`: one label per image); None when every image is its
    own group, so that an ungrouped set is resampled by image exactly as before groups existed."""
    if groups is None:
        return None
    _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if inverse.max(initial=-1) + 1 == len(inverse):
        return None
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]


def too_few_groups(groups) -> str:
    """Why a test part gets no bootstrap CI ("" when it gets one): too few groups to resample. Counts
    groups of one image too (lung's test part may be two animals with one field each)."""
    if groups is None:
        return ""
    count = len(set(groups))
    if count >= MIN_GROUPS_FOR_CI:
        return ""
    return (f"too few groups for a bootstrap CI: the test part holds {count} groups of related images "
            f"(animals, patients, near-duplicates), a CI needs at least {MIN_GROUPS_FOR_CI}")


def resample(rng: np.random.Generator, n: int, units: list[np.ndarray] | None) -> np.ndarray:
    """Row indices of one bootstrap resample: n images, or as many groups as there are, with replacement."""
    if units is None:
        return rng.integers(0, n, n)
    return np.concatenate([units[k] for k in rng.integers(0, len(units), len(units))])


def bootstrap_intervals(y_true: np.ndarray, probs: np.ndarray, classes: list[str], n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95, groups=None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap over test images, resampled with replacement (seeded: reproducible).

    With `groups` (a label per image), whole groups are resampled: related images (one animal,
    near-duplicates) are not independent draws. Fewer than MIN_GROUPS_FOR_CI groups: no intervals.
    """
    units = bootstrap_units(groups)
    if too_few_groups(groups):
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    n = len(y_true)
    for _ in range(n_boot):
        idx = resample(rng, n, units)
        # Class averages over the classes this resample holds (as sklearn's balanced accuracy): one
        # that drew no image of a rare class scored it 0 and biased the intervals down (a perfect
        # model on 49/49/2 images got balanced accuracy [0.67, 1]). A class's own interval, and
        # ROC AUC's (undefined without every class), come from the resamples that hold it.
        for key, value in classification_metrics(y_true[idx], probs[idx], classes).items():
            samples.setdefault(key, []).append(value)
    tail = (1 - level) / 2 * 100
    return {
        key: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
        for key, values in samples.items()
    }


def confusion(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class (scikit-learn's confusion_matrix)."""
    cells = np.asarray(y_true) * n_classes + probs.argmax(1)
    return np.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def exact_accuracy_interval(y_true: np.ndarray, probs: np.ndarray, level: float = 0.95,
                            groups=None) -> tuple[float, float] | None:
    """Clopper-Pearson interval of accuracy (a binomial proportion). Unlike the percentile
    bootstrap it does not collapse to [1, 1] when every one of a few test images is right.

    None where the images come in `groups` (as bootstrap_units reads them): it counts each image as
    an independent draw, and one animal's fields are not, so it would be narrower than the data
    allow. Omitted rather than labelled: a CI beside the honest one invites reading the tighter."""
    from scipy.stats import binomtest

    if bootstrap_units(groups) is not None:
        return None
    correct = int((probs.argmax(1) == y_true).sum())
    interval = binomtest(correct, len(y_true)).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Two classifiers on the same test images: how many each gets right where the other is wrong,
    and McNemar's exact two-sided p-value (a binomial test on those discordant images only).
    Two accuracies' separate CIs overlap long before a paired test is unsure; the images both get
    right or both get wrong say nothing about which is better."""
    from scipy.stats import binomtest

    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1:
        raise ValueError(f"one flag per test image for both classifiers, not {correct_a.shape} and {correct_b.shape}")
    only_a, only_b = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"images": len(correct_a), "only_a": only_a, "only_b": only_b, "p": float(p)}
