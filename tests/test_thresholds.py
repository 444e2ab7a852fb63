"""Promotion's per-target thresholds and test-time augmentation (analysis/thresholds.py) on a fold
ensemble: chosen out of fold (each field judged by the member that did not train on it), with the
8-view augmentation kept only where it raises validation Dice, and never under a latency budget."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_trainables import SEGMENTER

from tune_cells.analysis.segmentation_metrics import dice_from_counts, overlap_counts
from tune_cells.analysis.thresholds import choose_thresholds
from tune_cells.data.folds import fold_of
from tune_cells.model_io import load_spec, save_checkpoint, save_spec
from tune_cells.segmentation import ImageSegmenter
from tune_cells.trainables.segmentation import SegmentationData, train_segmenter
from tune_cells.trainables.skeleton import LocalSession

KEYS = {"validation_score", "threshold_bright", "val_dice_bright_at_0.5", "val_dice_bright_at_threshold", "tta",
        "val_dice_tta_none"}


def pooled_fields(max_epochs: int, count: int = 4, folds: int = 2) -> SegmentationData:
    """`count` distinct 64×64 fields pooled and cut into `folds` (as `--folds` does: no validation part)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]
    masks = [(image[None, :, :, 0] > 128).astype(np.uint8) for image in images]
    return SegmentationData(images, masks, [], [], "lung", ["bright"], (0.5,) * 3, (0.3,) * 3, max_epochs,
                            seed=0, fold_of=fold_of(count, folds, 0))


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """A real two-fold segmentation ensemble: two epochs per member at a high learning rate, past the
    near-constant prediction of a first epoch (whose best threshold marks almost the whole field)."""
    folder = tmp_path_factory.mktemp("thresholds") / "ckpt"
    data = pooled_fields(2)
    session = LocalSession(checkpoint_dir=folder)
    train_segmenter({**SEGMENTER, "lr": 0.01}, data, session)
    assert session.failure is None and load_spec(folder).members == ["fold0", "fold1"]
    return folder, data


def out_of_fold_dice(folder, data, threshold: float, tta: str) -> float:
    """The mean per-field Dice when each field is predicted by the member that held it out."""
    spec = load_spec(folder)
    spec.tta = tta
    scores = []
    for image, mask, fold in zip(data.train_images, data.train_masks, data.fold_of):
        member = ImageSegmenter.from_checkpoint(folder / spec.members[fold])
        member.spec = spec  # the ensemble's temperature and tta
        predicted = (member.predict_proba(image)[0] > threshold).astype(np.uint8)
        scores.append(dice_from_counts(overlap_counts(mask[0], predicted)))
    return float(np.mean(scores))


def test_a_fold_ensemble_keeps_test_time_augmentation_only_where_it_raises_out_of_fold_dice(ensemble, tmp_path):
    folder = shutil.copytree(ensemble[0], tmp_path / "ckpt")
    data = ensemble[1]
    chosen = choose_thresholds(folder, data, allow_tta=True)
    assert set(chosen) == KEYS | {"val_dice_tta_dihedral"}
    assert 0.1 <= chosen["threshold_bright"] <= 0.9
    # the 8-view mean costs 8 passes per tile: kept only if strictly better, a tie keeps none
    better = chosen["val_dice_tta_dihedral"] > chosen["val_dice_tta_none"]
    assert chosen["tta"] == ("dihedral" if better else "none")
    assert chosen["validation_score"] == chosen[f"val_dice_tta_{chosen['tta']}"] == chosen[
        "val_dice_bright_at_threshold"] >= chosen["val_dice_bright_at_0.5"]
    # out of fold: each field scored by the member that did not train on it, not by the whole ensemble
    assert chosen["validation_score"] == pytest.approx(
        out_of_fold_dice(folder, data, chosen["threshold_bright"], chosen["tta"]), abs=1e-12)
    spec = load_spec(folder)
    assert spec.tta == chosen["tta"] and spec.thresholds == {"bright": chosen["threshold_bright"]}

    # under a latency budget: no augmentation is tried, and a spec that had it loses it
    save_spec(folder, replace(load_spec(folder), tta="dihedral"))
    budgeted = choose_thresholds(folder, data, allow_tta=False)
    assert set(budgeted) == KEYS and budgeted["tta"] == "none"
    assert budgeted["val_dice_tta_none"] == chosen["val_dice_tta_none"]  # the same out-of-fold fields and members
    assert load_spec(folder).tta == "none"


def test_a_tie_between_with_and_without_augmentation_keeps_none(ensemble, tmp_path):
    """Members whose weights are all zero predict the same constant logits for every flip and turn:
    both choices score exactly alike, and the cheaper one is kept."""
    folder = shutil.copytree(ensemble[0], tmp_path / "ckpt")
    for name in load_spec(folder).members:
        spec = load_spec(folder / name)
        network = spec.load_network(folder / name)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.zero_()
        save_checkpoint(folder / name, network, spec)
    chosen = choose_thresholds(folder, ensemble[1], allow_tta=True)
    assert chosen["val_dice_tta_dihedral"] == chosen["val_dice_tta_none"]
    assert chosen["tta"] == "none" and load_spec(folder).tta == "none"


def test_a_fold_ensemble_of_other_folds_is_refused(ensemble):
    folder, _ = ensemble
    with pytest.raises(ValueError, match="2 networks for 4 folds"):
        choose_thresholds(folder, pooled_fields(2, count=8, folds=4))


def test_a_space_can_fix_the_threshold_and_always_augment(ensemble, tmp_path):
    """`threshold_choice: fixed` keeps the trial's `threshold`, `tta_choice: always` skips the choice
    (session 15's 10-field bench: both choices on 2 validation fields cost severe inflammation on
    unseen fields); validation is still scored, at what the model will predict with."""
    folder = shutil.copytree(ensemble[0], tmp_path / "ckpt")
    spec = load_spec(folder)
    save_spec(folder, replace(spec, config={**spec.config, "threshold": 0.42, "threshold_choice": "fixed",
                                            "tta_choice": "always"}))
    chosen = choose_thresholds(folder, ensemble[1], allow_tta=True)
    assert set(chosen) == KEYS - {"val_dice_tta_none"} | {"val_dice_tta_dihedral"}
    assert (chosen["threshold_bright"], chosen["tta"]) == (0.42, "dihedral")  # off the grid: kept, not chosen
    assert chosen["validation_score"] == pytest.approx(out_of_fold_dice(folder, ensemble[1], 0.42, "dihedral"), abs=1e-12)
    assert load_spec(folder).thresholds == {"bright": 0.42} and load_spec(folder).tta == "dihedral"
    assert choose_thresholds(folder, ensemble[1], allow_tta=False)["tta"] == "none"  # a latency budget still wins
