"""Each kind's trainable, one or two epochs on tiny generated data, outside Ray Tune (Lightning's
`fast_dev_run` idea): a wiring or loop bug fails here in seconds, not in a minutes-long search."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tune_cells.kinds import load_predictor
from tune_cells.model_io import load_spec, load_trainer_state
from tune_cells.trainables.classification import METRICS, ClassificationData, train_classifier
from tune_cells.trainables.segmentation import SegmentationData, metric_keys, train_segmenter
from tune_cells.trainables.skeleton import LocalSession


def classification_data(max_epochs: int) -> ClassificationData:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8)
    images = rng.integers(0, 120, (16, 16, 16, 3), dtype=np.uint8)
    images[labels == 1] += 120  # learnable: class 1 is brighter
    return ClassificationData(images, labels, images[:6], labels[:6], "nuclei", ["dim", "bright"], 3, 16,
                              (0.4,) * 3, (0.25,) * 3, max_epochs, seed=0)


def segmentation_data(max_epochs: int) -> SegmentationData:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    masks = [(image[None, :, :, 0] > 128).astype(np.uint8) for image in images]
    return SegmentationData(images, masks, images[:1], masks[:1], "lung", ["bright"], (0.5,) * 3, (0.3,) * 3,
                            max_epochs, seed=0)


CLASSIFIER = {"model": "small_convnet", "depth": 1, "width": 4, "lr": 0.01, "batch_size": 8, "image_size": 16}
SEGMENTER = {"model": "unet", "depth": 3, "base_width": 8, "lr": 0.001, "batch_size": 2, "views_per_epoch": 4,
             "scale": 1.0, "tile_size": 64}


@pytest.mark.parametrize("train, data, config, keys", [
    (train_classifier, classification_data, CLASSIFIER, METRICS),
    (train_segmenter, segmentation_data, SEGMENTER, metric_keys(["bright"])),
], ids=["classification", "segmentation"])
def test_one_epoch_reports_every_metric_and_a_loadable_checkpoint(tmp_path, train, data, config, keys):
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train(config, data(1), session)
    assert session.failure is None and len(session.results) == 1
    assert set(keys) <= set(session.results[0]) and np.isfinite(session.results[0]["val_loss"])
    spec = load_spec(tmp_path / "ckpt")
    assert spec.format == 2 and spec.config["seed"] == 0 and spec.config["lr"] == config["lr"]
    predictor = load_predictor(tmp_path / "ckpt")  # evaluate, predict and serve load it so
    assert predictor.spec.classes == spec.classes


def test_a_resumed_trial_continues_from_its_checkpoint(tmp_path):
    first = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, classification_data(1), first)
    assert load_trainer_state(tmp_path / "ckpt")["epoch"] == 1
    resumed = LocalSession(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, classification_data(3), resumed)
    assert len(resumed.results) == 2  # epochs 2 and 3 only
    assert load_trainer_state(tmp_path / "again")["epoch"] == 3


def test_a_diverged_trial_is_reported_as_failed_not_raised(tmp_path):
    from dataclasses import replace

    session = LocalSession()
    broken = replace(classification_data(3), std=(0.0,) * 3)  # inputs become inf: the loss is NaN at once
    train_classifier(CLASSIFIER, broken, session)
    assert session.failure and "diverged at epoch" in session.failure


def test_the_training_step_imports_and_runs_without_ray_or_mlflow():
    """A GPU machine may have torch and nothing else: the trainer must not need Ray or MLflow."""
    code = (
        "import sys\n"
        "sys.modules['ray'] = None; sys.modules['mlflow'] = None; sys.modules['optuna'] = None\n"
        "from tests.test_trainables import CLASSIFIER, classification_data\n"
        "from tune_cells.trainables.classification import train_classifier\n"
        "from tune_cells.trainables.skeleton import LocalSession\n"
        "session = LocalSession()\n"
        "train_classifier(CLASSIFIER, classification_data(1), session)\n"
        "assert session.results and session.failure is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_fold_ensemble_trial_trains_k_models_and_reports_their_mean(tmp_path):
    """`--folds 3`: one trial, three fold models on the pooled parts; the checkpoint is one model
    whose probabilities are the mean of its members'."""
    from dataclasses import replace

    from tune_cells.classifier import ImageClassifier
    from tune_cells.data.folds import fold_of
    from tune_cells.kinds import CLASSIFICATION

    pooled = classification_data(1)
    data = replace(pooled, val_images=pooled.train_images[:0], val_labels=pooled.train_labels[:0],
                   fold_of=fold_of(16, 3, 0, pooled.train_labels))
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, data, session)
    assert session.failure is None and len(session.results) == 1
    spec = load_spec(tmp_path / "ckpt")
    assert spec.members == ["fold0", "fold1", "fold2"]
    chosen = CLASSIFICATION.finalize(tmp_path / "ckpt", data)  # out-of-fold TTA and temperature
    ensemble = load_predictor(tmp_path / "ckpt")
    assert ensemble.spec.temperature == pytest.approx(chosen["temperature"])
    members = [ImageClassifier.from_checkpoint(tmp_path / "ckpt" / name) for name in spec.members]
    for member in members:  # each member as its own model, with the ensemble's temperature and TTA
        member.spec.temperature, member.spec.tta = ensemble.spec.temperature, ensemble.spec.tta
    images = data.train_images
    expected = np.mean([member.predict_proba(images) for member in members], axis=0)
    np.testing.assert_allclose(ensemble.predict_proba(images), expected, atol=1e-6)
    np.testing.assert_allclose(torch.softmax(ensemble.model(ensemble.preset(images)), 1).detach().numpy(),
                               ensemble.predict_proba(images) if ensemble.spec.tta == "none" else
                               torch.softmax(ensemble.model(ensemble.preset(images)), 1).detach().numpy(), atol=1e-5)

    resumed = LocalSession(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, replace(data, max_epochs=2), resumed)
    assert len(resumed.results) == 1 and load_trainer_state(tmp_path / "again" / "fold2")["epoch"] == 2


def test_a_segmentation_fold_ensemble_averages_logits(tmp_path):
    from dataclasses import replace

    from tune_cells.segmentation import LogitEnsemble

    pooled = segmentation_data(1)
    data = replace(pooled, train_images=pooled.train_images * 2, train_masks=pooled.train_masks * 2,
                   val_images=[], val_masks=[], fold_of=np.array([0, 1, 0, 1]))
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_segmenter(SEGMENTER, data, session)
    assert session.failure is None and "val_dice" in session.results[0]
    segmenter = load_predictor(tmp_path / "ckpt")
    assert isinstance(segmenter.model, LogitEnsemble) and len(segmenter.model.members) == 2
    assert segmenter.predict_masks(pooled.train_images[0]).shape == (1, 64, 64)
