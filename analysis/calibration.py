"""Whether predicted probabilities mean what they say: expected calibration error, and the
temperature that makes them so on validation data (Guo et al., "On Calibration of Modern Neural
Networks", 2017: one scalar divides the logits; argmax, and so accuracy, is unchanged)."""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15
TEMPERATURE_RANGE = (0.5, 20.0)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """(bin centres, accuracy per bin, confidence per bin, images per bin); empty bins are NaN."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.array([correct[which == b].mean() if counts[b] else np.nan for b in range(bins)])
    mean_confidence = np.array([confidence[which == b].mean() if counts[b] else np.nan for b in range(bins)])
    return (edges[:-1] + edges[1:]) / 2, accuracy, mean_confidence, counts


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """The temperature T in TEMPERATURE_RANGE minimising the negative log-likelihood of
    softmax(logits / T). The likelihood is convex in 1/T, so a bounded search over log T finds
    the same T as an unbounded one clipped to the range. (Bounded: a T far below 1 turns a few
    validation images into certainty for every image.) A 1-D search in NumPy: torch's optimiser
    cost ~1.4 s of first-call set-up in the driver, which trains nothing else."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-9}).x
    best = min((found, low, high), key=nll)  # an optimum beyond the range is its bound, exactly
    return TEMPERATURE_RANGE[0] if best == low else TEMPERATURE_RANGE[1] if best == high else float(np.exp(best))


def calibrate(classifier, images: np.ndarray, labels: np.ndarray, fold_of: np.ndarray | None = None,
              allow_tta: bool = True) -> dict[str, float | str]:
    """Set a classifier's test-time augmentation (kept when allowed and it raises balanced accuracy
    on these validation images, or keeps it and lowers the loss) and temperature (fitted on them). A
    fold ensemble is judged out of fold: each image by the member that did not train on it."""
    from sklearn.metrics import balanced_accuracy_score

    labels = np.asarray(labels)
    scored = {}
    for tta in ("none", "dihedral") if allow_tta else ("none",):
        classifier.spec.tta = tta
        logits = _held_out_logits(classifier, images, fold_of)
        nll = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels)))
        scored[tta] = (balanced_accuracy_score(labels, logits.argmax(1).numpy()), -nll, logits)
    tta = max(scored, key=lambda name: scored[name][:2])
    score, _, logits = scored[tta]
    # Without a single validation error the likelihood only grows as T shrinks: nothing to fit on.
    errors = int((logits.argmax(1).numpy() != labels).sum())
    temperature = fit_temperature(logits, labels) if errors else 1.0
    classifier.spec.tta, classifier.spec.temperature = tta, temperature
    return {
        "validation_score": float(score), "tta": tta, "temperature": temperature,
        "validation_score_without_tta": float(scored["none"][0]), "validation_errors": errors,
        "val_ece_before": expected_calibration_error(torch.softmax(logits, 1).numpy(), labels),
        "val_ece_after": expected_calibration_error(torch.softmax(logits / temperature, 1).numpy(), labels),
    }


def _held_out_logits(classifier, images: np.ndarray, fold_of: np.ndarray | None) -> torch.Tensor:
    """Logits of images no network trained on: the model's, or each fold member's on its own fold."""
    if fold_of is None:
        return classifier.predict_logits(images)
    logits = None
    for k in range(len(classifier.members)):
        held = np.flatnonzero(fold_of == k)
        member = classifier.member_logits(images[held], only=k)[0]
        logits = logits if logits is not None else torch.empty(len(images), member.shape[1])
        logits[held] = member
    return logits
