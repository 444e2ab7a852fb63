"""Probabilities that mean what they say, and a champion that only moves when it is better."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tune_cells.analysis.calibration import calibrate, expected_calibration_error, fit_temperature
from tune_cells.analysis.promotion import compare
from tune_cells.classifier import ImageClassifier
from tune_cells.model_io import ModelSpec
from tune_cells.models import create_model


def calibrated_logits(n: int = 4000, classes: int = 4, seed: int = 0):
    """Logits whose softmax is calibrated by construction: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, classes))
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins (15 equal): 0.9 -> right, 0.8 -> wrong, 0.6 -> right, 0.7 -> right; each bin holds one image
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_an_overconfident_model_gets_a_temperature_above_1_and_a_lower_ece():
    logits, labels = calibrated_logits()
    overconfident = logits * 3
    temperature = fit_temperature(overconfident, labels)
    assert 2.5 < temperature < 3.5
    before = expected_calibration_error(torch.softmax(torch.tensor(overconfident), 1).numpy(), labels)
    after = expected_calibration_error(torch.softmax(torch.tensor(overconfident) / temperature, 1).numpy(), labels)
    assert after < before / 3


def test_calibrate_sets_the_model_that_predict_and_serve_use(tmp_path):
    torch.manual_seed(0)
    model = create_model("small_convnet", num_classes=2, in_channels=3, depth=1, width=4)
    with torch.no_grad():  # make it overconfident
        model[-1].weight.mul_(40)
    spec = ModelSpec("nuclei", "small_convnet", ["a", "b"], 3, 16, 16, [0.5] * 3, [0.25] * 3,
                     {"model": "small_convnet", "depth": 1, "width": 4, "lr": 0.01})
    classifier = ImageClassifier(model, spec)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 64)
    chosen = calibrate(classifier, images, labels)
    assert chosen["tta"] in ("none", "dihedral") and classifier.spec.tta == chosen["tta"]
    assert classifier.spec.temperature == chosen["temperature"] > 1
    assert chosen["val_ece_after"] < chosen["val_ece_before"]
    expected = torch.softmax(classifier.predict_logits(images) / chosen["temperature"], 1).numpy()
    np.testing.assert_allclose(classifier.predict_proba(images), expected, atol=1e-6)


def version(number: int, score: float, split: str = "s1"):
    return SimpleNamespace(version=number, tags={"split_sha256": split, "validation_score": f"{score:.6f}"})


@pytest.mark.parametrize("champion, mine, moves, reason", [
    (None, {"split_sha256": "s1", "validation_score": "0.5"}, True, "champion: there was none"),
    (version(3, 0.8), {"split_sha256": "s1", "validation_score": "0.9"}, True,
     "champion: better on validation (val_balanced_accuracy 0.9000 > 0.8000 of version 3)"),
    (version(3, 0.8), {"split_sha256": "s1", "validation_score": "0.8"}, False,
     "challenger: not better on validation (val_balanced_accuracy 0.8000 <= 0.8000 of champion version 3)"),
    (version(3, 0.8), {"split_sha256": "s2", "validation_score": "0.99"}, False,
     "challenger: not comparable with champion version 3 (scored on another split file)"),
    (SimpleNamespace(version=2, tags={"split_sha256": "s1", "val_balanced_accuracy": "0.7"}),
     {"split_sha256": "s1", "validation_score": "0.75"}, True, "0.7500 > 0.7000 of version 2"),
])
def test_the_champion_moves_only_for_a_better_comparable_version(champion, mine, moves, reason):
    decision = compare(mine, champion, "val_balanced_accuracy", "max")
    assert decision.champion == moves and reason in decision.reason
    assert decision.previous == (str(champion.version) if moves and champion else None)


def test_a_validation_part_without_errors_leaves_the_temperature_at_1():
    """Perfectly separated validation data would drive the fitted T towards 0 (certainty for all)."""
    torch.manual_seed(0)
    model = create_model("small_convnet", num_classes=2, in_channels=3, depth=1, width=4)
    spec = ModelSpec("nuclei", "small_convnet", ["a", "b"], 3, 16, 16, [0.5] * 3, [0.25] * 3,
                     {"model": "small_convnet", "depth": 1, "width": 4, "lr": 0.01})
    classifier = ImageClassifier(model, spec)
    images = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    spec.tta = "dihedral"
    labels = classifier.predict_logits(images).argmax(1).numpy()  # right on every image, with TTA
    spec.tta = "none"
    chosen = calibrate(classifier, images, labels)
    if chosen["validation_errors"] == 0:
        assert chosen["temperature"] == 1.0
    assert fit_temperature(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.array([0, 1])) == 0.5  # bounded
