"""Multi-target segmentation: full-size images with one binary mask per target (U-Net, tiled)."""

from __future__ import annotations

from pathlib import Path

from tune_cells.config import SegmentationConfig
from tune_cells.errors import UserInputError
from tune_cells.kinds.base import CardWording, TaskKind, TrialInputs


class SegmentationKind(TaskKind):
    name = "segmentation"
    config_type = SegmentationConfig
    label_noun = "target"
    card_wording = CardWording(labels="its targets", output="a mask for each of {n} targets: {names}",
                               use="marking {names} in images like those it was trained on ({task})",
                               limit="It marks only {names}; nothing else in an image is marked.")
    explainable = False
    writes_masks = True

    def decode_for_search(self, task, index, store_size):  # full size: store_size is 0
        from tune_cells.data.images import full_array, mask_array, scan_images

        paths = list(index.items["path"])
        scan = scan_images(index.root, paths, frozenset(paths), full_array)
        for target in index.classes:
            masks = list(index.items[f"mask:{target}"])
            kept = scan_images(index.root, masks, frozenset(masks), mask_array).kept
            if not any(mask.any() for mask in kept.values()):  # a mask format read wrongly, or the wrong folder
                raise UserInputError(f"{index.root / Path(masks[0]).parent}: every {target} mask is empty "
                                     "(the target is white, > 127, or the one non-zero level of a lossless mask)")
            scan.kept.update(kept)
        return scan

    def object_store_bytes(self, task, index, split, store_size) -> int:
        from PIL import Image

        pixels = 0
        for path in split.parts["train"] + split.parts["val"]:  # each field's header: sizes may differ
            with Image.open(index.root / path) as image:
                pixels += image.width * image.height
        return pixels * (3 + len(index.classes))  # full-size images and their masks

    def trial_inputs(self, task, index, reader, max_epochs, seed, folds: int = 1) -> TrialInputs:
        from tune_cells.data.folds import fold_of, pooled_groups
        from tune_cells.segmentation import pixel_stats
        from tune_cells.trainables.segmentation import SegmentationData, metric_keys, train_segmenter

        classes = list(index.classes)
        train_images, train_masks = reader.load_segmentation("train", "training")
        val_images, val_masks = reader.load_segmentation("val", "selection" if folds == 1 else "training (folds)")
        if folds > 1:  # pooled, then cut into folds: every image validates exactly one fold model
            images, masks = train_images + val_images, train_masks + val_masks
            mean, std = pixel_stats(images)
            data = SegmentationData(images, masks, [], [], task.name, classes, mean, std, max_epochs, seed,
                                    fold_of=fold_of(len(images), folds, seed, groups=pooled_groups(reader.split)),
                                    metric=task.metric, mode=task.mode)
        else:
            mean, std = pixel_stats(train_images)
            data = SegmentationData(train_images, train_masks, val_images, val_masks, task.name, classes, mean, std,
                                    max_epochs, seed, metric=task.metric, mode=task.mode)
        return TrialInputs(train_segmenter, data, metric_keys(classes), ("val_loss", "val_dice"))

    def compares_with_recipe(self, data) -> bool:
        """Each score behind `val_dice` has an error: two or more validation fields (with folds: per fold)."""
        import numpy as np

        if data.fold_of is not None:
            return int(np.bincount(data.fold_of).min()) >= 2
        return len(data.val_images) >= 2

    def selection_error(self, data, result) -> float | None:
        """The best trial's `val_dice_se` at its best epoch: the per-image spread of Dice over the
        validation fields (with folds, the error of the mean over folds). None for trials from before
        it was reported."""
        import math

        se = result.best_metrics.get("val_dice_se")
        return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None

    def fold_labels(self, index, paths):
        return None  # no class per image: folds are cut plainly

    def describe(self, index) -> str:
        return f"targets {index.classes}"

    def part_counts(self, index, split) -> dict[str, dict[str, int]]:
        return {part: {"images": len(paths)} for part, paths in split.parts.items()}

    def load_predictor(self, directory: Path, device: str = "cpu"):
        from tune_cells.segmentation import ImageSegmenter

        return ImageSegmenter.from_checkpoint(directory, device)

    def signature(self, classes: list[str]):
        """Input: a `path` or `image` (base64) column. Output: the image size and each target's pixel
        count and percentage."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "image", required=False)])
        columns = [ColSpec("long", "width"), ColSpec("long", "height")]
        for target in classes:
            columns += [ColSpec("long", f"pixels_{target}"), ColSpec("double", f"percent_{target}")]
        return ModelSignature(inputs=inputs, outputs=Schema(columns))

    def predict_files(self, predictor, names, images, mask_dir):
        from tune_cells.segmentation import write_predictions

        masks = [predictor.predict_masks(image) for image in images]
        return write_predictions(predictor, names, images, masks, mask_dir)

    def export_plan(self, predictor):
        from tune_cells.export_kinds import SegmenterExport

        return SegmenterExport(predictor)

    def finalize(self, checkpoint: Path, data, allow_tta: bool = True) -> dict[str, float | str]:
        """A threshold per target chosen on validation (out of fold with --folds): a rare target's
        best cut is rarely 0.5; and test-time augmentation where it helps there, or as the trial's
        `threshold_choice` and `tta_choice` say. Stored in the model's spec; `predict`, `serve`,
        `evaluate` and `export` use them."""
        from tune_cells.analysis.thresholds import choose_thresholds

        return choose_thresholds(checkpoint, data, allow_tta)

    def evaluate(self, context):
        from tune_cells.analysis.segmentation_evaluation import evaluate_segmenter

        return evaluate_segmenter(context)

    def test_scorer(self, reader, n_boot):
        from tune_cells.analysis.segmentation_evaluation import SegmentationScorer

        return SegmentationScorer(reader, n_boot)


SEGMENTATION = SegmentationKind()
