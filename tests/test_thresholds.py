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
from tune_cells.analysis.thresholds import _best_thresholds, choose_thresholds
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


def two_fields_split_on_0_7(share_above: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two 8x8 fields, the target on rows 0-3. Field one: target 0.9, background 0.7, so any cut from
    0.7 to 0.85 is perfect and 0.5 marks everything (Dice 2/3). Field two: background 0.1 and the
    target at 0.95 on `share_above` of its pixels, 0.6 on the rest, so 0.5 is perfect and 0.7 misses some."""
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, :4] = 1
    one = np.where(truth == 1, 0.9, 0.7)
    two = np.where(truth == 1, 0.6, 0.1)
    two.reshape(-1)[: round(32 * share_above)] = 0.95
    return [truth, truth], [one, two]


def test_one_se_keeps_0_5_unless_another_threshold_beats_it_by_more_than_a_standard_error():
    """The best threshold (0.7 to 0.85) beats 0.5 on the mean of two fields, but one field gains and the
    other loses: within one standard error the rule keeps 0.5 (`threshold_choice: one_se`, the
    lung spaces). Where both fields gain alike (no spread), it moves as the plain choice does."""
    masks, probabilities = two_fields_split_on_0_7(20 / 32)  # field two at 0.7: Dice 40/52
    best = _best_thresholds(masks, probabilities, ["t"])
    assert best[1] == {"t": 0.7} and best[0] == pytest.approx((1 + 40 / 52) / 2)
    score, chosen, gains = _best_thresholds(masks, probabilities, ["t"], one_se=True)
    assert chosen == {"t": 0.5} and score == pytest.approx(gains["val_dice_t_at_0.5"]) == pytest.approx(5 / 6)
    masks, probabilities = two_fields_split_on_0_7(1.0)  # both perfect from 0.7: no spread, no margin
    assert _best_thresholds(masks, probabilities, ["t"], one_se=True)[1] == {"t": 0.7}
    masks, probabilities = two_fields_split_on_0_7(20 / 32)
    assert _best_thresholds(masks[:1], probabilities[:1], ["t"], one_se=True)[1] == {"t": 0.7}  # one field: no SE
    # an anchor off the grid is itself a candidate (a trial's `threshold: 0.52`)
    assert _best_thresholds(masks, probabilities, ["t"], anchor=0.52, one_se=True)[1] == {"t": 0.52}


def test_a_space_can_choose_thresholds_by_one_standard_error(ensemble, tmp_path, monkeypatch):
    """`threshold_choice: one_se` through promotion's own path: the rule is applied around the trial's
    `threshold`, the threshold it keeps is scored as the model will predict, and never beats the
    plain choice's best on validation."""
    from tune_cells.analysis import thresholds

    rules = []
    real = thresholds._best_thresholds
    monkeypatch.setattr(thresholds, "_best_thresholds",
                        lambda *args, **rule: rules.append(rule) or real(*args, **rule))
    folder = shutil.copytree(ensemble[0], tmp_path / "ckpt")
    spec = load_spec(folder)
    save_spec(folder, replace(spec, config={**spec.config, "threshold_choice": "one_se", "tta_choice": "never"}))
    chosen = choose_thresholds(folder, ensemble[1], allow_tta=True)
    assert [(r["one_se"], r["anchor"]) for r in rules] == [(True, 0.5)]
    threshold = chosen["threshold_bright"]
    assert chosen["validation_score"] == pytest.approx(out_of_fold_dice(folder, ensemble[1], threshold, "none"), abs=1e-12)
    assert chosen["val_dice_bright_at_threshold"] >= chosen["val_dice_bright_at_0.5"] - 1e-12
    plain = shutil.copytree(ensemble[0], tmp_path / "plain")
    save_spec(plain, replace(spec, config={**spec.config, "threshold": 0.3, "tta_choice": "never"}))
    assert choose_thresholds(plain, ensemble[1])["validation_score"] >= chosen["validation_score"] - 1e-12
    assert [(r["one_se"], r["anchor"]) for r in rules[1:]] == [(False, 0.5)]  # `validation`: ties nearest 0.5 as before
