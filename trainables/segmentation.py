"""Ray Tune function trainable for multi-target segmentation (U-Net), beside the classification one.

Shared with classification: the Ray adapter (report, resume), the checkpoint format (state_dict +
JSON ModelSpec), the optimisers and LR schedules. The driver decodes the train and validation
images once at full size; each trial rescales them to its `scale`, trains on random square views
(`tile_size` original pixels, dihedral flips and stain jitter) and validates on whole validation
images through the same tiled, stitched prediction that evaluation and `predict` use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tune_cells.analysis.segmentation_metrics import per_image_dice_se, segmentation_scores
from tune_cells.config import SegmentationConfig, first_averaged_epoch
from tune_cells.model_io import ModelSpec
from tune_cells.segmentation import pad_to_view, predict_logits_tiled, rescale_image, rescale_masks, working_tile
from tune_cells.trainables.skeleton import FoldedData, TrialSession, TrialTrainer, ray_session, run_trial
from tune_cells.training import NonFiniteLossError, Precision, WeightAverage, recompute_batchnorm
from tune_cells.transforms import EvalPreset, TrainPreset


def metric_keys(targets: list[str]) -> tuple[str, ...]:
    per_target = [f"val_{m}_{t}" for t in targets for m in ("dice", "jaccard", "pooled_dice")]
    return ("train_loss", "val_loss", "val_dice", "val_jaccard", "val_pooled_dice", *per_target, "val_dice_se", "lr",
            "epoch_time_s")


@dataclass(frozen=True)
class SegmentationData(FoldedData):
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
    fold_of: np.ndarray | None = None  # K-fold: the fold of each pooled image (train_* hold them all)
    metric: str = "val_dice"  # the search's metric and mode
    mode: str = "max"

    def fold(self, k: int) -> SegmentationData:
        """Fold k's data: the other folds train, fold k validates."""
        held = [i for i, f in enumerate(self.fold_of) if f == k]
        kept = [i for i, f in enumerate(self.fold_of) if f != k]
        return replace(self, train_images=[self.train_images[i] for i in kept],
                       train_masks=[self.train_masks[i] for i in kept],
                       val_images=[self.train_images[i] for i in held], val_masks=[self.train_masks[i] for i in held],
                       fold_of=None)


class SegmentationLoss(nn.Module):
    """BCE, soft Dice, or their sum, on multi-label logits.

    The soft Dice is one per target over the whole batch, smoothed by 1: a target absent from every
    view of a batch still scores 1 / (1 + predicted mass), so false positives on empty views cost
    (segmentation-models-pytorch's multilabel Dice drops such a target from the loss)."""

    def __init__(self, name: str):  # one of SegmentationConfig's `loss` values
        super().__init__()
        self.name = name

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.name in ("bce", "bce_dice"):
            loss = loss + F.binary_cross_entropy_with_logits(logits, target)
        if self.name in ("dice", "bce_dice"):
            loss = loss + soft_dice_loss(logits, target)
        return loss


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    probabilities = torch.sigmoid(logits)
    dims = (0, *range(2, logits.dim()))  # batch and pixels: one score per target
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


def sample_views(images: list[np.ndarray], masks: list[np.ndarray], count: int, tile: int,
                 rng: np.random.Generator, dihedral: bool, focus: list[np.ndarray | None] | None = None,
                 focus_rate: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`count` random square views (uint8 N×t×t×3, and N×T×t×t masks) of images at least `tile` on
    each side (smaller ones padded first: `pad_to_view`). With `focus` (per image, pixels of the rare
    target, or None) a `focus_rate` share of the views is centred on one of those pixels, so a target
    covering 1-5 % of a field is seen often enough."""
    views, view_masks = [], []
    focused = [k for k, points in enumerate(focus or []) if points is not None and len(points)]
    for _ in range(count):
        centre = None
        if focused and rng.random() < focus_rate:
            k = focused[int(rng.integers(len(focused)))]
            centre = focus[k][int(rng.integers(len(focus[k])))]
        else:
            k = int(rng.integers(len(images)))
        image, mask = images[k], masks[k]
        if centre is None:
            y = int(rng.integers(image.shape[0] - tile + 1))
            x = int(rng.integers(image.shape[1] - tile + 1))
        else:  # jittered around the pixel, inside the image
            y = int(np.clip(centre[0] - tile // 2 + rng.integers(-tile // 4, tile // 4 + 1), 0, image.shape[0] - tile))
            x = int(np.clip(centre[1] - tile // 2 + rng.integers(-tile // 4, tile // 4 + 1), 0, image.shape[1] - tile))
        view, view_mask = image[y : y + tile, x : x + tile], mask[:, y : y + tile, x : x + tile]
        if dihedral:  # tissue has no "up": flips and right-angle turns, the same for image and masks
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            view, view_mask = np.rot90(view, turns, (0, 1)), np.rot90(view_mask, turns, (1, 2))
            if flip:
                view, view_mask = view[:, ::-1], view_mask[:, :, ::-1]
        views.append(np.ascontiguousarray(view))
        view_masks.append(np.ascontiguousarray(view_mask))
    return np.stack(views), np.stack(view_masks)


def rare_target_pixels(masks: list[np.ndarray], rng: np.random.Generator, keep: int = 4096) -> list[np.ndarray | None]:
    """Per training image, up to `keep` (y, x) pixels of the target with the fewest pixels overall."""
    totals = np.sum([m.reshape(m.shape[0], -1).sum(1) for m in masks], axis=0)
    rare = int(np.argmin(np.where(totals > 0, totals, np.inf)))
    points = []
    for mask in masks:
        where = np.argwhere(mask[rare] > 0)
        points.append(where[rng.choice(len(where), min(keep, len(where)), replace=False)] if len(where) else None)
    return points


class SegmentationTrainer(TrialTrainer):
    config_type = SegmentationConfig
    oom_hint = "try a smaller batch_size, tile_size or scale"
    config: SegmentationConfig
    data: SegmentationData

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return metric_keys(self.data.targets)

    def setup(self) -> tuple[ModelSpec, nn.Module]:
        config, data = self.config, self.data
        self.rng = np.random.default_rng(self.seed)
        self.tile = working_tile(config.tile_size, config.scale)
        # A field smaller than a view is padded once, right and bottom, with the colour that normalises
        # to 0 and with background, as prediction pads it; its own pixels keep their place (focus points).
        fill = tuple(round(255 * value) for value in data.mean)
        padded = [pad_to_view(rescale_image(image, config.scale), rescale_masks(masks, config.scale), self.tile, fill)
                  for image, masks in zip(data.train_images, data.train_masks)]
        self.train_images, self.train_masks = [image for image, _ in padded], [masks for _, masks in padded]
        self.val_images = [rescale_image(i, config.scale) for i in data.val_images]
        self.val_masks = [rescale_masks(m, config.scale) for m in data.val_masks]
        self.focus = rare_target_pixels(self.train_masks, self.rng) if config.focus_rate > 0 else None
        spec = ModelSpec(task=data.task, architecture=config.model, classes=list(data.targets), channels=3,
                         store_size=0, image_size=self.tile, mean=list(data.mean), std=list(data.std),
                         config=config.to_flat(), kind="segmentation")
        self.loss_fn = SegmentationLoss(config.loss)
        self.eval_preset = EvalPreset(self.tile, tuple(data.mean), tuple(data.std))
        self.jitter = TrainPreset(self.eval_preset, flip=False, rotate90=False, color_jitter=config.color_jitter)
        self.precision = Precision.for_device(self.device, config.mixed_precision, config.channels_last)
        self.average: WeightAverage | None = None  # from `swa_start` on: what validates and is checkpointed
        return spec, self.precision.prepare_model(spec.build(load_pretrained=True).to(self.device))

    def promoted_weights(self) -> nn.Module:
        return self.average.model if self.average is not None else self.model

    def extra_state(self) -> dict:
        state = {"numpy_rng": self.rng.bit_generator.state}
        if self.average is not None:  # the checkpoint's weights are the average: training's own travel here
            state.update(trained_weights={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                         averaged_epochs=self.average.count)
        return state

    def restore_extra(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy_rng"]
        if "trained_weights" in state:  # the model holds the checkpoint's weights, the average
            self.average = WeightAverage(self.model, count=int(state["averaged_epochs"]))
            self.model.load_state_dict(state["trained_weights"])

    def offered_for_promotion(self) -> bool:  # with swa_start, only the averages
        return self.config.swa_start is None or self.average is not None

    def averages_this_epoch(self) -> bool:
        """Stochastic weight averaging: every epoch past `swa_start` of the search's max epochs."""
        start = self.config.swa_start
        return start is not None and self.epoch >= first_averaged_epoch(start, self.data.max_epochs)

    def held_lr(self) -> tuple[int, float] | None:
        """(first epoch, factor of each group's initial rate) from which the rate holds: SWA's constant
        rate (Izmailov et al. 2018) over the averaged epochs, so the averaged weights differ more than a
        schedule decaying to 1 % lets them."""
        if self.config.swa_lr is None:
            return None
        return first_averaged_epoch(self.config.swa_start, self.data.max_epochs), self.config.swa_lr

    def prepare_epoch(self) -> None:
        held = self.held_lr()
        if held is not None and self.epoch >= held[0]:  # over the schedule's own value, every epoch (and on resume)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * held[1]

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        batch_size = self.config.batch_size
        views, view_masks = sample_views(self.train_images, self.train_masks, self.config.views_per_epoch, self.tile,
                                         self.rng, self.config.dihedral, self.focus, self.config.focus_rate)
        total = torch.zeros((), device=self.device)  # summed on the device, checked once (see train_one_epoch)
        for start in range(0, len(views), batch_size):
            x = self.jitter(torch.from_numpy(views[start : start + batch_size]).to(self.device), self.generator)
            x = self.precision.prepare_input(x)
            y = torch.from_numpy(view_masks[start : start + batch_size]).to(self.device).float()
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast(self.device):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(x)
        mean = float(total) / len(views)
        if not math.isfinite(mean):
            raise NonFiniteLossError(f"training loss became {mean} (try a lower learning rate)")
        if self.averages_this_epoch():
            self.average = self.average or WeightAverage(self.model)
            self.average.add(self.model)
        return {"train_loss": mean}

    def batchnorm_batches(self, views: int | None = None):
        """`views` (default `batchnorm_views`) uniform training views, the same before every validation
        (drawn once from their own generator: the trial's draws, and a resumed trial's, stay as they were)."""
        views = views or self.config.batchnorm_views
        if getattr(self, "_batchnorm_views", None) is None or len(self._batchnorm_views) != views:
            self._batchnorm_views, _ = sample_views(self.train_images, self.train_masks, views, self.tile,
                                                    np.random.default_rng(self.seed), dihedral=False)
        for start in range(0, len(self._batchnorm_views), self.config.batch_size):
            batch = torch.from_numpy(self._batchnorm_views[start : start + self.config.batch_size]).to(self.device)
            yield self.precision.prepare_input(self.eval_preset(batch))

    def validate(self) -> dict[str, float]:
        model = self.promoted_weights()
        if self.config.batchnorm_views:  # precise BN: what the checkpoint keeps and promotion promotes
            with self.precision.autocast(self.device):
                recompute_batchnorm(model, self.batchnorm_batches())
        val_loss, predicted = 0.0, []
        for image, mask in zip(self.val_images, self.val_masks):
            logits = predict_logits_tiled(model, image, self.eval_preset, self.tile, self.config.overlap,
                                          self.device, precision=self.precision)
            val_loss += float(self.loss_fn(logits[None], torch.from_numpy(mask)[None].float()))
            predicted.append((torch.sigmoid(logits) > self.config.threshold).numpy())
        scores, rows = segmentation_scores(self.val_masks, predicted, list(self.data.targets), "val_")
        return {"val_loss": val_loss / len(self.val_images), **scores,
                "val_dice_se": per_image_dice_se(rows, len(self.val_images))}


def train_segmenter(config: dict, data: SegmentationData, session: TrialSession | None = None) -> None:
    """The Ray Tune function trainable (Tune passes `config` and the object-store `data`)."""
    run_trial(SegmentationTrainer, config, data, session or ray_session())
