"""Image classification: one label per image, decoded to one square size per dataset (its native size, capped)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from tune_cells.config import ClassificationConfig
from tune_cells.kinds.base import CardWording, TaskKind, TrialInputs


class ClassificationKind(TaskKind):
    name = "classification"
    config_type = ClassificationConfig
    label_noun = "class"
    card_wording = CardWording(labels="its classes", output="one of {n} classes: {names}",
                               use="sorting images like those it was trained on ({task}) into {names}",
                               limit="It knows only {names}; anything else is given one of these.")
    explainable = True
    writes_masks = False

    def decode_for_search(self, task, index, store_size):
        from tune_cells.data.images import scan_images, store_array

        paths = list(index.items["path"])
        return scan_images(index.root, paths, frozenset(paths),
                           partial(store_array, channels=task.channels, size=store_size))

    def object_store_bytes(self, task, index, split, store_size) -> int:
        from tune_cells.data.resolution import decoded_bytes

        return decoded_bytes(len(split.parts["train"]) + len(split.parts["val"]), store_size, task.channels)

    def trial_inputs(self, task, index, reader, max_epochs, seed, folds: int = 1) -> TrialInputs:
        import numpy as np

        from tune_cells.data.folds import fold_of, pooled_groups
        from tune_cells.trainables.classification import METRICS, ClassificationData, train_classifier
        from tune_cells.transforms import channel_stats

        train_images, train_labels = reader.load("train", "training")
        val_images, val_labels = reader.load("val", "selection" if folds == 1 else "training (folds)")
        fields = dict(task=task.name, classes=list(index.classes), channels=task.channels,
                      store_size=reader.size, max_epochs=max_epochs, seed=seed, metric=task.metric,
                      mode=task.mode)
        if folds > 1:  # pooled, then cut into folds: every image validates exactly one fold model
            images, labels = np.concatenate([train_images, val_images]), np.concatenate([train_labels, val_labels])
            mean, std = channel_stats(images)
            folds_of = fold_of(len(images), folds, seed, labels, pooled_groups(reader.split), list(index.classes))
            data = ClassificationData(images, labels, images[:0], labels[:0], mean=mean, std=std, **fields,
                                      fold_of=folds_of)
        else:
            mean, std = channel_stats(train_images)
            data = ClassificationData(train_images, train_labels, val_images, val_labels, mean=mean, std=std,
                                      **fields)
        return TrialInputs(train_classifier, data, METRICS, ("val_loss", "val_balanced_accuracy"))

    def compares_with_recipe(self, data) -> bool:
        return True

    def selection_error(self, data, result) -> float | None:
        from tune_cells.analysis.selection import balanced_accuracy_se

        return balanced_accuracy_se(result.best_metric, self.selection_counts(data))

    def selection_counts(self, data) -> list[int]:
        """Validation images per class behind the balanced accuracy."""
        import numpy as np

        # With folds every pooled image validates once (train_* hold them all, val_* is empty).
        labels = data.train_labels if data.fold_of is not None else data.val_labels
        return np.bincount(labels, minlength=len(data.classes)).tolist()

    def fold_labels(self, index, paths):
        import numpy as np

        labels = dict(zip(index.items["path"], index.items["label"]))
        return np.array([labels[p] for p in paths], dtype=np.int64)

    def describe(self, index) -> str:
        return str(index.class_counts())

    def part_counts(self, index, split) -> dict[str, dict[str, int]]:
        labels = dict(zip(index.items["path"], index.items["label"]))
        return {part: {name: sum(labels[p] == i for p in paths) for i, name in enumerate(index.classes)}
                for part, paths in split.parts.items()}

    def load_predictor(self, directory: Path, device: str = "cpu"):
        from tune_cells.classifier import ImageClassifier

        return ImageClassifier.from_checkpoint(directory, device)

    def signature(self, classes: list[str]):
        """Input: a `path` (local file) or `image` (base64 bytes) column. Output: class + probabilities."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "image", required=False)])
        outputs = Schema([ColSpec("string", "predicted_class"), *[ColSpec("double", f"prob_{c}") for c in classes]])
        return ModelSignature(inputs=inputs, outputs=outputs)

    def predict_files(self, predictor, names, images, mask_dir):
        return predictor.predict_table(images)

    def export_plan(self, predictor):
        from tune_cells.export_kinds import ClassifierExport

        return ClassifierExport(predictor)

    def finalize(self, checkpoint: Path, data, allow_tta: bool = True) -> dict[str, float | str]:
        """Test-time augmentation when it helps on validation (and is allowed), then a temperature fitted there."""
        from tune_cells.analysis.calibration import calibrate
        from tune_cells.classifier import ImageClassifier
        from tune_cells.model_io import save_spec

        classifier = ImageClassifier.from_checkpoint(checkpoint)
        if data.folds > 1:  # out of fold: the pooled images, each judged by the member it validated
            chosen = calibrate(classifier, data.train_images, data.train_labels, data.fold_of, allow_tta)
        else:
            chosen = calibrate(classifier, data.val_images, data.val_labels, allow_tta=allow_tta)
        save_spec(checkpoint, classifier.spec)
        return chosen

    def evaluate(self, context):
        from tune_cells.analysis.classification_evaluation import evaluate_classifier

        return evaluate_classifier(context)

    def test_scorer(self, reader, n_boot):
        from tune_cells.analysis.classification_evaluation import ClassificationScorer

        return ClassificationScorer(reader, n_boot)


CLASSIFICATION = ClassificationKind()
