"""Ray Tune function trainable for image classification.

The driver decodes the train and validation parts once and hands them to every trial through
Ray's object store (`ClassificationData`); the test part never reaches a trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tune_cells import ray_backend
from tune_cells.model_io import ModelSpec, restore_training
from tune_cells.trainables.common import report_epoch, start_trial
from tune_cells.training import (
    NonFiniteLossError,
    Precision,
    build_lr_schedule,
    build_optimizer,
    evaluate_logits,
    is_out_of_memory,
    predict_logits,
    step_lr_schedule,
    train_one_epoch,
)
from tune_cells.transforms import TrainPreset

METRICS = ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "lr", "epoch_time_s", "data_time_s")


@dataclass(frozen=True)
class ClassificationData:
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


def train_classifier(config: dict, data: ClassificationData) -> None:
    trial = start_trial(config, data.seed)
    device, seed, generator = trial.device, trial.seed, trial.generator
    spec = ModelSpec(
        task=data.task, architecture=config["model"], classes=list(data.classes), channels=data.channels,
        store_size=data.store_size, image_size=int(config.get("image_size", data.store_size)),
        mean=list(data.mean), std=list(data.std), config={**config, "seed": seed},
    )
    precision = Precision.for_device(device, config)
    model = precision.prepare_model(spec.build(load_pretrained=True).to(device))
    optimizer = build_optimizer(config, model)
    schedule = build_lr_schedule(config, optimizer, data.max_epochs)
    train_loss_fn = nn.CrossEntropyLoss(label_smoothing=float(config.get("label_smoothing", 0.0)))
    val_loss_fn = nn.CrossEntropyLoss()  # unsmoothed, so val_loss compares across trials
    preset = TrainPreset(
        spec.preset(), flip=bool(config.get("flip", True)), rotate90=bool(config.get("rotate90", True)),
        affine=float(config.get("affine", 0.0)), color_jitter=float(config.get("color_jitter", 0.0)),
    )
    train_labels = torch.tensor(data.train_labels)  # copies: object-store arrays are read-only
    val_labels = torch.tensor(data.val_labels)

    first_epoch = 1
    with ray_backend.resumed_checkpoint() as checkpoint:
        if checkpoint is not None:  # resume where this trial stopped, not from epoch 1
            state = restore_training(checkpoint, model, optimizer, schedule, generator, device)
            first_epoch = int(state["epoch"]) + 1

    for epoch in range(first_epoch, data.max_epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batch_size = int(config.get("batch_size", 32))
        try:
            train_loss, data_time = train_one_epoch(model, data.train_images, train_labels, optimizer, preset,
                                                    batch_size, train_loss_fn, device, generator, precision)
        except NonFiniteLossError as exc:
            ray_backend.report_failure(f"diverged at epoch {epoch}: {exc}", METRICS[:4])
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # a failed trial with a hint, not a dead search
            raise MemoryError(f"out of memory at batch_size {batch_size} on {device}: try a smaller batch_size, "
                              "fewer trials per GPU (--gpus-per-trial) or a smaller image_size") from exc
        val = evaluate_logits(predict_logits(model, data.val_images, preset.eval_preset, device, precision=precision),
                              val_labels, val_loss_fn)
        step_lr_schedule(schedule, val["loss"])
        metrics = {
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "lr": lr,
            "epoch_time_s": time.perf_counter() - started,
            "data_time_s": data_time,  # batch preparation (indexing, augmentation): the input pipeline's share
            "node_id": trial.node_id,
        }
        report_epoch(metrics, epoch, model, spec, optimizer, schedule, generator)

