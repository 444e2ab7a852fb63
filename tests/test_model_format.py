"""The versioned model format: format 2 reads every format-1 checkpoint with defaults that
reproduce it, refuses what it cannot honour, and applies temperature and test-time augmentation."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tune_cells.classifier import ImageClassifier, dihedral_views
from tune_cells.errors import UserInputError
from tune_cells.model_io import MODEL_FORMAT, ModelSpec, load_spec, save_checkpoint
from tune_cells.models import create_model

FORMAT_1 = {"task": "nuclei", "architecture": "small_convnet", "classes": ["a", "b"], "channels": 3, "store_size": 16,
            "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
            "config": {"model": "small_convnet", "depth": 1, "width": 4, "lr": 0.01, "seed": 0}, "format": 1,
            "kind": "classification"}


def write_spec(folder, document) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(document))


def test_a_format_1_spec_reads_with_defaults_that_reproduce_it(tmp_path):
    write_spec(tmp_path, FORMAT_1)
    spec = load_spec(tmp_path)
    assert spec.format == 1 and MODEL_FORMAT == 2
    assert (spec.members, spec.temperature, spec.tta, spec.thresholds, spec.input_stem) == ([], 1.0, "none", {},
                                                                                          "default")


@pytest.mark.parametrize("change, message", [
    ({"format": 3}, "model format 3 is newer than this tune-cells reads"),
    ({"format": 2, "calibration": "isotonic"}, "unknown model field 'calibration'"),
    ({"format": 2, "tta": "d4"}, "tta 'd4'; known: none, dihedral"),
])
def test_what_this_version_cannot_honour_is_refused_by_name(tmp_path, change, message):
    write_spec(tmp_path, {**FORMAT_1, **change})
    with pytest.raises(UserInputError, match=message):
        load_spec(tmp_path)


def classifier(tmp_path, **format_2) -> ImageClassifier:
    torch.manual_seed(0)
    model = create_model("small_convnet", num_classes=2, in_channels=3, depth=1, width=4)
    spec = ModelSpec(**{**FORMAT_1, "format": 2, **format_2})
    save_checkpoint(tmp_path, model, spec)
    return ImageClassifier.from_checkpoint(tmp_path)


def test_temperature_divides_the_logits(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    plain = classifier(tmp_path / "plain")
    warm = classifier(tmp_path / "warm", temperature=3.0)
    expected = torch.softmax(plain.predict_logits(images) / 3.0, 1).numpy()
    np.testing.assert_allclose(warm.predict_proba(images), expected, atol=1e-6)


def test_dihedral_tta_averages_the_eight_views(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    plain = classifier(tmp_path / "plain")
    tta = classifier(tmp_path / "tta", tta="dihedral")
    views = dihedral_views(images)
    assert len({v.tobytes() for v in views}) == 8
    expected = torch.stack([plain.predict_logits(v) for v in views]).mean(0)
    torch.testing.assert_close(tta.predict_logits(images), expected)
    assert asdict(tta.spec)["tta"] == "dihedral"


def test_joined_retrains_predict_the_mean_of_their_members(tmp_path):
    """seed_ensemble.join: two networks trained under seeds 7 and 107 become one model folder whose
    probabilities are the mean of theirs; training state is dropped; the first member's spec leads."""
    from tune_cells.analysis.seed_ensemble import join, member_name, member_seeds

    images = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    folders = []
    for k, seed in enumerate([7, *member_seeds(7, 2)]):
        torch.manual_seed(k)
        model = create_model("small_convnet", num_classes=2, in_channels=3, depth=1, width=4)
        save_checkpoint(tmp_path / str(seed), model, ModelSpec(**{**FORMAT_1, "format": 2, "config": {**FORMAT_1["config"], "seed": seed}}),
                        trainer_state={"epoch": 3})
        folders.append((member_name(seed), tmp_path / str(seed)))
    expected = np.mean([ImageClassifier.from_checkpoint(folder).predict_proba(images) for _, folder in folders], 0)
    join(folders, tmp_path / "ensemble")
    joined = ImageClassifier.from_checkpoint(tmp_path / "ensemble")
    np.testing.assert_allclose(joined.predict_proba(images), expected, atol=1e-6)
    assert load_spec(tmp_path / "ensemble").members == ["seed7", "seed107"]
    assert not list((tmp_path / "ensemble").rglob("trainer.pt")) and not (tmp_path / "7").exists()
