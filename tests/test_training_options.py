"""The optimisation choices of the default spaces (#15): class balance, a smaller rate for a
pretrained backbone than for its new head, a warm-up, and frozen features whose BatchNorm
statistics stay frozen too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainables import CLASSIFIER, classification_data

from tune_cells.config import ClassificationConfig
from tune_cells.models import create_model
from tune_cells.trainables.classification import train_classifier
from tune_cells.trainables.skeleton import LocalSession
from tune_cells.training import build_lr_schedule, build_optimizer, class_balance_weights, freeze_frozen_batchnorm


def config(**values) -> ClassificationConfig:
    return ClassificationConfig.from_flat({"model": "resnet18", "lr": 0.01, **values}, strict=False)


def test_inverse_frequency_weights_have_mean_one_over_the_images():
    labels = np.array([0] * 90 + [1] * 10)
    weights = class_balance_weights(labels, 3)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20, 0.0])
    assert float(weights[torch.as_tensor(labels)].mean()) == pytest.approx(1.0)


def test_the_backbone_trains_at_a_fraction_of_the_heads_rate():
    model = create_model("resnet18", num_classes=3, in_channels=3)
    optimizer = build_optimizer(config(backbone_lr_scale=0.1), model)
    head, backbone = optimizer.param_groups
    assert head["lr"] == 0.01 and backbone["lr"] == pytest.approx(0.001)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.fc.parameters()}
    assert len(build_optimizer(config(), model).param_groups) == 1  # scale 1: one group


def test_warm_up_rises_linearly_then_the_cosine_runs():
    model = create_model("resnet18", num_classes=3, in_channels=3)
    optimizer = build_optimizer(config(warmup_epochs=2, lr_schedule="cosine"), model)
    schedule = build_lr_schedule(config(warmup_epochs=2, lr_schedule="cosine"), optimizer, max_epochs=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.01 / 3) and rates[1] == pytest.approx(0.02 / 3)
    assert rates[2] == pytest.approx(0.01) and rates[-1] < rates[2]


def test_the_schedules_read_their_floor_factor_and_patience_from_the_configuration():
    """Seed 001's ReduceLROnPlateau (x0.1 after 1 epoch) is a space's values, not code."""
    from tune_cells.training import step_lr_schedule

    model = create_model("resnet18", num_classes=3, in_channels=3)
    plateau = config(lr_schedule="plateau", plateau_factor=0.1, plateau_patience=1)
    optimizer = build_optimizer(plateau, model)
    schedule = build_lr_schedule(plateau, optimizer, max_epochs=10)
    for loss in (1.0, 1.0, 1.0):  # no gain for two epochs after the first: one drop
        step_lr_schedule(schedule, loss)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    cosine = config(lr_schedule="cosine", lr_floor=0.1)
    optimizer = build_optimizer(cosine, model)
    schedule = build_lr_schedule(cosine, optimizer, max_epochs=4)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


def test_frozen_features_keep_their_batchnorm_statistics():
    model = create_model("resnet18", num_classes=3, in_channels=3, freeze_features=True)
    model.train()
    freeze_frozen_batchnorm(model)
    assert not model.bn1.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_a_trial_trains_with_class_balance(balance):
    session = LocalSession()
    train_classifier({**CLASSIFIER, "class_balance": balance}, classification_data(1), session)
    assert session.failure is None and np.isfinite(session.results[0]["train_loss"])
