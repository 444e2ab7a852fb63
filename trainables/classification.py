"""Ray Tune function trainable for image classification.

The driver decodes the train and validation parts once and hands them to every trial through
Ray's object store (`ClassificationData`); the test part never reaches a trial.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from tune_cells.config import ClassificationConfig
from tune_cells.model_io import ModelSpec
from tune_cells.trainables.skeleton import FoldedData, TrialSession, TrialTrainer, ray_session, run_trial
from tune_cells.training import (
    Precision,
    class_balance_weights,
    evaluate_logits,
    on_device,
    predict_logits,
    train_one_epoch,
)
from tune_cells.transforms import TrainPreset

METRICS = ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "lr", "epoch_time_s", "data_time_s")


@dataclass(frozen=True)
class ClassificationData(FoldedData):
    train_images: np.ndarray  # uint8 N×H×W×C
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    task: str
    classes: list[str]
    channels: int
    store_size: int
    mean: tuple[float, ...]  # of the training part
    std: tuple[float, ...]
    max_epochs: int
    seed: int
    fold_of: np.ndarray | None = None  # K-fold: the fold of each pooled image (train_* hold them all)
    metric: str = "val_balanced_accuracy"  # the search's metric and mode
    mode: str = "max"

    def fold(self, k: int) -> ClassificationData:
        """Fold k's data: the other folds train, fold k validates."""
        held = self.fold_of == k
        return replace(self, train_images=self.train_images[~held], train_labels=self.train_labels[~held],
                       val_images=self.train_images[held], val_labels=self.train_labels[held], fold_of=None)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_statistics(config: ClassificationConfig, data: ClassificationData) -> tuple[tuple, tuple]:
    """ImageNet's normalisation for ImageNet-pretrained filters (a grey channel gets the mean of its
    three, as it is repeated to RGB); otherwise the training part's own."""
    if not config.model_kwargs.get("pretrained"):
        return data.mean, data.std
    if data.channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * data.channels, (sum(IMAGENET_STD) / 3,) * data.channels


class ClassificationTrainer(TrialTrainer):
    config_type = ClassificationConfig
    oom_hint = "try a smaller batch_size, fewer trials per GPU (--gpus-per-trial) or a smaller image_size"
    config: ClassificationConfig
    data: ClassificationData

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return METRICS

    def setup(self) -> tuple[ModelSpec, nn.Module]:
        config, data = self.config, self.data
        mean, std = input_statistics(config, data)
        spec = ModelSpec(task=data.task, architecture=config.model, classes=list(data.classes), channels=data.channels,
                         store_size=data.store_size, image_size=config.image_size or data.store_size,
                         mean=list(mean), std=list(std), config=config.to_flat(),
                         input_stem=str(config.model_kwargs.get("stem", "default")))
        self.precision = Precision.for_device(self.device, config.mixed_precision, config.channels_last)
        model = self.precision.prepare_model(spec.build(load_pretrained=True).to(self.device))
        balance = class_balance_weights(np.asarray(data.train_labels), len(data.classes))
        self.sample_weights = balance[torch.as_tensor(data.train_labels)] if config.class_balance == "sampler" else None
        self.train_loss_fn = nn.CrossEntropyLoss(weight=balance.to(self.device) if config.class_balance == "loss" else None,
                                                 label_smoothing=config.label_smoothing)
        self.val_loss_fn = nn.CrossEntropyLoss()  # unsmoothed, so val_loss compares across trials
        self.preset = TrainPreset(spec.preset(), flip=config.flip, rotate90=config.rotate90, affine=config.affine,
                                  color_jitter=config.color_jitter)
        self.train_images = on_device(data.train_images, self.device)
        self.val_images = on_device(data.val_images, self.device)
        self.train_labels = torch.tensor(data.train_labels, device=self.device)  # copies: object-store arrays
        self.val_labels = torch.tensor(data.val_labels)  # are read-only
        return spec, model

    def train_epoch(self) -> dict[str, float]:
        loss, data_time = train_one_epoch(self.model, self.train_images, self.train_labels, self.optimizer,
                                          self.preset, self.config.batch_size, self.train_loss_fn, self.device,
                                          self.generator, self.precision, self.sample_weights)
        # data_time_s: batch preparation (indexing, augmentation), the input pipeline's share
        return {"train_loss": loss, "data_time_s": data_time}

    def validate(self) -> dict[str, float]:
        logits = predict_logits(self.model, self.val_images, self.preset.eval_preset, self.device,
                                precision=self.precision)
        val = evaluate_logits(logits, self.val_labels, self.val_loss_fn)
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "val_balanced_accuracy": val["balanced_accuracy"]}


def train_classifier(config: dict, data: ClassificationData, session: TrialSession | None = None) -> None:
    """The Ray Tune function trainable (Tune passes `config` and the object-store `data`)."""
    run_trial(ClassificationTrainer, config, data, session or ray_session())
