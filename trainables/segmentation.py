"""Ray Tune function trainable for multi-target segmentation (U-Net), beside the classification one.

Shared with classification: the Ray adapter (report, resume), the checkpoint format (state_dict +
JSON ModelSpec), the optimisers and LR schedules. The driver decodes the train and validation
images once at full size; each trial rescales them to its `scale`, trains on random square views
(`tile_size` original pixels, dihedral flips and stain jitter) and validates on whole validation
images through the same tiled, stitched prediction that evaluation and `predict` use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tune_cells import ray_backend
from tune_cells.analysis.segmentation_metrics import segmentation_scores
from tune_cells.model_io import ModelSpec, restore_training
from tune_cells.segmentation import LOSSES, predict_logits_tiled, rescale_image, rescale_masks, working_tile
from tune_cells.trainables.common import report_epoch, start_trial
from tune_cells.training import (NonFiniteLossError, build_lr_schedule, build_optimizer, is_out_of_memory,
                                 step_lr_schedule)
from tune_cells.transforms import EvalPreset, TrainPreset


def metric_keys(targets: list[str]) -> tuple[str, ...]:
    per_target = [f"val_{m}_{t}" for t in targets for m in ("dice", "jaccard", "pooled_dice")]
    return ("train_loss", "val_loss", "val_dice", "val_jaccard", "val_pooled_dice", *per_target, "lr", "epoch_time_s")


@dataclass(frozen=True)
class SegmentationData:
    train_images: list[np.ndarray]  # full-size uint8 H×W×3
    train_masks: list[np.ndarray]  # uint8 0/1 T×H×W
    val_images: list[np.ndarray]
    val_masks: list[np.ndarray]
    task: str
    targets: list[str]
    mean: tuple[float, ...]  # of the training images
    std: tuple[float, ...]
    max_epochs: int
    seed: int


class SegmentationLoss(nn.Module):
    """BCE, soft Dice (segmentation-models-pytorch's), or their sum, on multi-label logits."""

    def __init__(self, kind: str):
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss

        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
        self.kind = kind
        self.dice = DiceLoss("multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.kind in ("bce", "bce_dice"):
            loss = loss + F.binary_cross_entropy_with_logits(logits, target)
        if self.kind in ("dice", "bce_dice"):
            loss = loss + self.dice(logits, target)
        return loss


def sample_views(images: list[np.ndarray], masks: list[np.ndarray], count: int, tile: int,
                 rng: np.random.Generator, dihedral: bool) -> tuple[np.ndarray, np.ndarray]:
    """`count` random square views (uint8 N×t×t×3, and N×T×t×t masks), images padded where small."""
    views, view_masks = [], []
    for _ in range(count):
        k = int(rng.integers(len(images)))
        image, mask = _pad_to(images[k], masks[k], tile)
        y = int(rng.integers(image.shape[0] - tile + 1))
        x = int(rng.integers(image.shape[1] - tile + 1))
        view, view_mask = image[y : y + tile, x : x + tile], mask[:, y : y + tile, x : x + tile]
        if dihedral:  # tissue has no "up": flips and right-angle turns, the same for image and masks
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            view, view_mask = np.rot90(view, turns, (0, 1)), np.rot90(view_mask, turns, (1, 2))
            if flip:
                view, view_mask = view[:, ::-1], view_mask[:, :, ::-1]
        views.append(np.ascontiguousarray(view))
        view_masks.append(np.ascontiguousarray(view_mask))
    return np.stack(views), np.stack(view_masks)


def _pad_to(image: np.ndarray, mask: np.ndarray, tile: int):
    pad_h, pad_w = max(0, tile - image.shape[0]), max(0, tile - image.shape[1])
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        mask = np.pad(mask, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    return image, mask


def train_segmenter(config: dict, data: SegmentationData) -> None:
    trial = start_trial(config, data.seed)
    device, seed, generator = trial.device, trial.seed, trial.generator
    rng = np.random.default_rng(seed)
    scale = float(config.get("scale", 0.5))
    tile = working_tile(int(config.get("tile_size", 512)), scale)
    overlap = float(config.get("overlap", 0.25))
    threshold = float(config.get("threshold", 0.5))
    train_images = [rescale_image(i, scale) for i in data.train_images]
    train_masks = [rescale_masks(m, scale) for m in data.train_masks]
    val_images = [rescale_image(i, scale) for i in data.val_images]
    val_masks = [rescale_masks(m, scale) for m in data.val_masks]

    spec = ModelSpec(task=data.task, architecture=config.get("model", "unet"), classes=list(data.targets), channels=3,
                     store_size=0, image_size=tile, mean=list(data.mean), std=list(data.std),
                     config={**config, "seed": seed}, kind="segmentation")
    model = spec.build(load_pretrained=True).to(device)
    optimizer = build_optimizer(config, model)
    schedule = build_lr_schedule(config, optimizer, data.max_epochs)
    loss_fn = SegmentationLoss(config.get("loss", "bce_dice"))
    eval_preset = EvalPreset(tile, tuple(data.mean), tuple(data.std))
    jitter = TrainPreset(eval_preset, flip=False, rotate90=False, color_jitter=float(config.get("color_jitter", 0.0)))

    first_epoch = 1
    with ray_backend.resumed_checkpoint() as checkpoint:
        if checkpoint is not None:  # resume where this trial stopped, not from epoch 1
            state = restore_training(checkpoint, model, optimizer, schedule, generator, device)
            rng.bit_generator.state = state["numpy_rng"]
            first_epoch = int(state["epoch"]) + 1

    views_per_epoch = int(config.get("views_per_epoch", 32))
    batch_size = int(config.get("batch_size", 4))
    for epoch in range(first_epoch, data.max_epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        views, view_masks = sample_views(train_images, train_masks, views_per_epoch, tile, rng,
                                         bool(config.get("dihedral", True)))
        total = 0.0
        try:
            for start in range(0, len(views), batch_size):
                x = jitter(views[start : start + batch_size], generator).to(device)
                y = torch.from_numpy(view_masks[start : start + batch_size]).float().to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"training loss became {loss.item()} (try a lower learning rate)")
                loss.backward()
                optimizer.step()
                total += loss.item() * len(x)
        except NonFiniteLossError as exc:
            ray_backend.report_failure(f"diverged at epoch {epoch}: {exc}", metric_keys(data.targets)[:3])
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # a failed trial with a hint, not a dead search
            raise MemoryError(f"out of memory at batch_size {batch_size}, tile {tile} on {device}: try a smaller "
                              "batch_size, tile_size or scale") from exc
        val_loss, predicted = 0.0, []
        for image, mask in zip(val_images, val_masks):
            logits = predict_logits_tiled(model, image, eval_preset, tile, overlap, device)
            val_loss += float(loss_fn(logits[None], torch.from_numpy(mask)[None].float()))
            predicted.append((torch.sigmoid(logits) > threshold).numpy())
        scores, _ = segmentation_scores(val_masks, predicted, list(data.targets), "val_")
        step_lr_schedule(schedule, val_loss / len(val_images))
        metrics = {"train_loss": total / len(views), "val_loss": val_loss / len(val_images), **scores, "lr": lr,
                   "epoch_time_s": time.perf_counter() - started, "node_id": trial.node_id}
        report_epoch(metrics, epoch, model, spec, optimizer, schedule, generator, numpy_rng=rng.bit_generator.state)
