"""Lung's training and promotion details (issue #15): a Dice that penalises false positives on
views without the target, views centred on the rare target, thresholds and test-time augmentation chosen on validation,
and the average of the weights over the second half (stochastic weight averaging)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_trainables import SEGMENTER, segmentation_data

from tune_cells.model_io import load_spec
from tune_cells.trainables.segmentation import rare_target_pixels, sample_views, soft_dice_loss, train_segmenter
from tune_cells.trainables.skeleton import LocalSession


def test_the_dice_loss_charges_false_positives_on_views_without_the_target():
    empty = torch.zeros(2, 1, 8, 8)
    assert soft_dice_loss(torch.full((2, 1, 8, 8), 6.0), empty) > 0.95  # everything predicted, nothing there
    assert soft_dice_loss(torch.full((2, 1, 8, 8), -10.0), empty) < 0.05  # nothing predicted: right
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, :4] = 1
    assert soft_dice_loss((target * 20 - 10), target) < 0.01


def test_focused_views_are_centred_on_the_rare_target():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((2, 128, 128), np.uint8) for _ in range(3)]
    for mask in masks:
        mask[0, :, :64] = 1  # common
    masks[1][1, 100:108, 100:108] = 1  # rare: 64 pixels of one image
    focus = rare_target_pixels(masks, rng)
    assert focus[0] is None and len(focus[1]) == 64
    _, view_masks = sample_views(images, masks, 20, 32, rng, True, focus, focus_rate=1.0)
    assert all(m[1].any() for m in view_masks)
    _, uniform = sample_views(images, masks, 20, 32, rng, True, focus, focus_rate=0.0)
    assert sum(m[1].any() for m in uniform) < 10


def test_a_field_smaller_than_a_view_trains_on_background_padding_and_is_predicted_at_its_own_size(tmp_path):
    """nnU-Net's way with a field smaller than its patch (a 200x150 lung field, 256-pixel views): the
    trial pads it right and bottom with the colour that normalises to 0 and its masks with
    background; prediction pads it alike and crops back. Copying the edge instead labelled the pad
    with the field's last row and column (here, all of it the target)."""
    from tune_cells.segmentation import ImageSegmenter
    from tune_cells.trainables.segmentation import SegmentationData, SegmentationTrainer

    rng = np.random.default_rng(0)
    field = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    masks = np.ones((1, 40, 50), np.uint8)  # the target reaches the field's edges
    data = SegmentationData([field, field], [masks, masks], [field], [masks], "lung", ["bright"], (0.6, 0.4, 0.7),
                            (0.3,) * 3, 1, seed=0)
    trainer = SegmentationTrainer(SEGMENTER, data, LocalSession(checkpoint_dir=tmp_path / "setup"))
    trainer.setup()  # tile_size 64 at scale 1: a 64-pixel view of a 40x50 field
    views, view_masks = sample_views(trainer.train_images, trainer.train_masks, 4, trainer.tile, rng, dihedral=True)
    assert views.shape == (4, 64, 64, 3) and view_masks.shape == (4, 1, 64, 64)
    assert view_masks.sum() == 4 * 40 * 50  # the field's pixels, each once: the pad is background
    padding = views.reshape(-1, 3)[~view_masks.reshape(-1).astype(bool)]
    assert (padding == (153, 102, 178)).all()  # the mean colour: 0 once normalised
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_segmenter(SEGMENTER, data, session)  # trains and validates (stitched) on the small field
    assert session.failure is None and np.isfinite(session.results[0]["val_loss"])
    segmenter = ImageSegmenter.from_checkpoint(tmp_path / "ckpt")
    assert segmenter.predict_masks(field).shape == (1, 40, 50)
    assert segmenter.predict_masks(field[:7, :3]).shape == (1, 7, 3)


def test_promotion_chooses_a_threshold_per_target_on_validation(tmp_path):
    from tune_cells.kinds import SEGMENTATION

    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    data = segmentation_data(2)
    train_segmenter({**SEGMENTER, "focus_rate": 0.5, "loss": "dice"}, data, session)
    chosen = SEGMENTATION.finalize(tmp_path / "ckpt", data)
    assert set(chosen) == {"validation_score", "threshold_bright", "val_dice_bright_at_0.5",
                           "val_dice_bright_at_threshold", "tta", "val_dice_tta_none", "val_dice_tta_dihedral"}
    assert 0.1 <= chosen["threshold_bright"] <= 0.9
    # the chosen cut is never worse on validation than the fixed 0.5 it replaces (the version keeps both)
    assert chosen["val_dice_bright_at_threshold"] >= chosen["val_dice_bright_at_0.5"]
    # test-time augmentation only where it gains on validation; its score is the one the threshold was chosen at
    other = {"none": "dihedral", "dihedral": "none"}[chosen["tta"]]
    assert chosen[f"val_dice_tta_{chosen['tta']}"] >= chosen[f"val_dice_tta_{other}"]
    assert chosen[f"val_dice_tta_{chosen['tta']}"] == chosen["val_dice_bright_at_threshold"] == chosen["validation_score"]
    spec = load_spec(tmp_path / "ckpt")
    assert spec.thresholds == {"bright": chosen["threshold_bright"]} and spec.tta == chosen["tta"]
    # under a latency budget (allow_tta False) there is no augmentation to choose
    assert SEGMENTATION.finalize(tmp_path / "ckpt", data, allow_tta=False)["tta"] == "none"
    assert load_spec(tmp_path / "ckpt").tta == "none"


def test_precise_batchnorm_averages_the_batches_and_leaves_frozen_layers_and_modes_alone():
    from torch import nn

    from tune_cells.training import recompute_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.BatchNorm2d(4))
    model[3].requires_grad_(False)  # frozen (freeze_features): keeps its statistics
    model[3].eval()
    model.train()
    model[3].eval()
    frozen_mean = model[3].running_mean.clone()
    batches = [torch.randn(8, 3, 5, 5) * s + s for s in (1.0, 3.0)]
    recompute_batchnorm(model, batches)
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    expected = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)  # the plain average of batch means
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert torch.equal(model[3].running_mean, frozen_mean)
    assert model.training and model[1].training and not model[3].training and model[1].momentum == 0.1


def test_with_batchnorm_views_the_checkpoint_keeps_statistics_recomputed_on_training_views(tmp_path):
    from tune_cells.model_io import WEIGHTS_FILE

    runs = {}
    for views in (0, 4):
        session = LocalSession(checkpoint_dir=tmp_path / f"ckpt-{views}")
        train_segmenter({**SEGMENTER, "batchnorm_views": views}, segmentation_data(3), session)
        assert session.failure is None
        runs[views] = torch.load(tmp_path / f"ckpt-{views}" / WEIGHTS_FILE, weights_only=True)
    key = next(k for k in runs[0] if k.endswith("running_mean"))
    assert not torch.allclose(runs[0][key], runs[4][key])  # recomputed, not training's running average
    learned = [k for k in runs[0] if "running_" not in k and "num_batches_tracked" not in k]
    assert all(torch.equal(runs[0][k], runs[4][k]) for k in learned)  # 3 epochs: training itself is the same


class EveryCheckpoint(LocalSession):
    """A LocalSession that keeps each epoch's checkpoint (Ray keeps the latest)."""

    def report(self, metrics: dict, checkpoint_dir=None) -> None:
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.checkpoint_dir.parent / f"epoch-{len(self.results)}")


AVERAGED = {**SEGMENTER, "batchnorm_views": 4, "swa_start": 0.5, "checkpoint_every": 1}


def test_from_swa_start_the_checkpoint_is_the_average_of_the_trained_weights(tmp_path):
    from tune_cells.model_io import WEIGHTS_FILE, load_trainer_state

    session = EveryCheckpoint(checkpoint_dir=tmp_path / "ckpt")
    train_segmenter(AVERAGED, segmentation_data(6), session)
    assert session.failure is None and len(session.results) == 6
    weights = {e: torch.load(tmp_path / f"epoch-{e}" / WEIGHTS_FILE, weights_only=True) for e in (3, 4, 5, 6)}
    trained = {e: load_trainer_state(tmp_path / f"epoch-{e}").get("trained_weights") for e in (3, 4, 5, 6)}
    assert trained[3] is None  # epochs 1-3 (not past half of 6): the trained weights themselves
    assert load_trainer_state(tmp_path / "epoch-6")["averaged_epochs"] == 3
    learned = [k for k in weights[6] if "running_" not in k and "num_batches_tracked" not in k]
    for key in learned:  # epochs 4, 5 and 6 averaged equally (not a moving average)
        assert torch.allclose(trained[4][key], weights[4][key])  # one epoch: the average is the epoch
        assert torch.allclose(weights[6][key], (trained[4][key] + trained[5][key] + trained[6][key]) / 3, atol=1e-6)
    assert not torch.equal(weights[6][learned[0]], trained[6][learned[0]])


def test_an_averaging_trial_resumes_exactly(tmp_path):
    from tune_cells.model_io import WEIGHTS_FILE

    whole = EveryCheckpoint(checkpoint_dir=tmp_path / "whole" / "ckpt")
    train_segmenter(AVERAGED, segmentation_data(6), whole)
    # from epoch 5, two epochs averaged: the average and the trained weights differ, and both must come back
    resumed = LocalSession(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "whole" / "epoch-5")
    train_segmenter(AVERAGED, segmentation_data(6), resumed)
    assert len(resumed.results) == 1
    assert resumed.results[0]["val_dice"] == whole.results[-1]["val_dice"]
    ended = torch.load(tmp_path / "again" / WEIGHTS_FILE, weights_only=True)
    expected = torch.load(tmp_path / "whole" / "epoch-6" / WEIGHTS_FILE, weights_only=True)
    assert all(torch.allclose(ended[k].float(), expected[k].float(), atol=1e-6) for k in expected)


def test_a_held_rate_trains_each_averaged_epoch_at_lr_times_swa_lr_also_after_a_weights_only_resume(tmp_path):
    from tune_cells.model_io import OPTIMIZER_FILE

    held = {**AVERAGED, "lr_schedule": "cosine", "swa_lr": 0.5}
    whole = EveryCheckpoint(checkpoint_dir=tmp_path / "whole" / "ckpt")
    train_segmenter(held, segmentation_data(6), whole)
    rates = [r["lr"] for r in whole.results]
    assert rates[0] == pytest.approx(1e-3) and 5e-4 < rates[2] < rates[1] < 1e-3  # the cosine over epochs 1-3
    assert rates[3:] == pytest.approx([5e-4] * 3)  # epochs 4-6 are averaged: the rate holds
    # a checkpoint without the optimiser's state (weights when the metric improved) still resumes at the held rate
    (tmp_path / "whole" / "epoch-4" / OPTIMIZER_FILE).unlink()
    resumed = LocalSession(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "whole" / "epoch-4")
    train_segmenter(held, segmentation_data(6), resumed)
    assert [r["lr"] for r in resumed.results] == pytest.approx([5e-4] * 2)
    # from the first epoch (swa_start 0), the first epoch is held too
    first = LocalSession(checkpoint_dir=tmp_path / "first")
    train_segmenter({**held, "swa_start": 0.0}, segmentation_data(2), first)
    assert [r["lr"] for r in first.results] == pytest.approx([5e-4] * 2)


def test_a_held_rate_needs_weight_averaging():
    from tune_cells.config import SegmentationConfig
    from tune_cells.errors import UserInputError

    with pytest.raises(UserInputError, match="swa_lr needs swa_start"):
        SegmentationConfig.from_flat({**SEGMENTER, "swa_lr": 0.5})


def test_weight_averaging_without_fresh_batchnorm_is_refused_in_one_line():
    from tune_cells.config import SegmentationConfig
    from tune_cells.errors import UserInputError

    with pytest.raises(UserInputError, match="swa_start needs batchnorm_views > 0"):
        SegmentationConfig.from_flat({**SEGMENTER, "swa_start": 0.5})


def test_an_averaging_trial_offers_only_its_averages_for_promotion(tmp_path):
    from tune_cells.promotion_rank import PROMOTION_PENALTY, PROMOTION_SCORE

    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_segmenter({**AVERAGED, "checkpoint_every": 100}, segmentation_data(4), session)
    scores = [r[PROMOTION_SCORE] - r["val_dice"] for r in session.results]
    assert scores == pytest.approx([-PROMOTION_PENALTY, -PROMOTION_PENALTY, 0, 0])  # epochs 1-2 trained; 3-4 averages
    assert session.results[2]["checkpoint_mb"] > 0  # the first average is kept, whatever epochs 1-2 scored
