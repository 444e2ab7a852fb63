"""Held-out evaluation of a registered model: the only code that reads the test part."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tune_cells.analysis.metrics import (
    bootstrap_intervals,
    classification_metrics,
    confusion,
    exact_accuracy_interval,
)
from tune_cells.analysis.plots import save_confusion_matrix
from tune_cells.data.reader import SplitReader
from tune_cells.data.splits import Split, load_or_create_split
from tune_cells.errors import UserInputError
from tune_cells.tasks import TaskSpec
from tune_cells.tracking import Tracker

log = logging.getLogger(__name__)

HEADLINE = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc")


@dataclass
class Evaluation:
    run_id: str
    model_uri: str
    version: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # percentile bootstrap, every metric
    exact_accuracy: tuple[float, float] | None  # Clopper-Pearson (classification)
    n_images: int
    output_dir: Path | None = None  # masks, overlays and the pixel-count table (segmentation)


def evaluate_registered(task: TaskSpec, tracker: Tracker, model_uri: str, workdir: Path, n_boot: int = 1000,
                        external: Path | None = None) -> Evaluation:
    """Score a registered model on the test part it was trained beside, or on every image of an
    `external` dataset in the task's layout (classes matched by name)."""
    version = tracker.resolve_model(model_uri, task.name)
    tags = version.tags
    classifier = tracker.load_classifier(model_uri)
    spec = classifier.spec
    parent_run_id = tags.get("search_run_id")

    if external is None:
        index, split = model_split(task, tracker, tags, workdir)
        part, source = "test", {"split_file": split.path.name, "split_sha256": split.sha256}
    else:
        index = task.importer(Path(external))
        unknown = [name for name in index.classes if name not in spec.classes]
        if unknown:
            kind = "target" if spec.kind == "segmentation" else "class"
            raise UserInputError(f"--data {index.root}: {kind} {unknown[0]!r} is not one the model knows "
                                 f"({', '.join(spec.classes)})")
        split = Split(path=Path(external), parts={"external": list(index.items["path"])}, seed=0)
        part, source = "external", {"external_data": str(index.root)}
    reader = SplitReader(index, split, spec.channels, spec.store_size, workdir)
    experiment_id = tracker.get_run(parent_run_id).info.experiment_id if parent_run_id else tracker.experiment_id(
        f"tune-cells-{task.name}")
    run_name = f"{'external-' if external is not None else ''}evaluation-v{version.version}"
    if spec.kind == "segmentation":
        from tune_cells.segmentation_evaluation import evaluate_segmenter

        return evaluate_segmenter(task, tracker, classifier, version, model_uri, reader, part, source,
                                  experiment_id, run_name, parent_run_id, workdir, n_boot)
    images, labels = reader.load(part, "evaluation")
    labels = np.array([spec.classes.index(index.classes[i]) for i in labels], dtype=np.int64)  # match by name
    probs = classifier.predict_proba(images)

    metrics = classification_metrics(labels, probs, spec.classes)
    intervals = bootstrap_intervals(labels, probs, spec.classes, n_boot=n_boot)
    exact = exact_accuracy_interval(labels, probs)
    run_id = tracker.start_run(experiment_id, run_name, "evaluation", parent_run_id,
                               tags={"model_uri": model_uri, "model_version": version.version, "task": task.name,
                                     "evaluation_data": part})
    try:
        tracker.log_params(run_id, {
            "model_uri": model_uri, "model_name": version.name, "model_version": version.version,
            **source, "test_images": len(labels),
            "bootstrap_resamples": n_boot,
        })
        ci_metrics = {f"{k}_ci_low": lo for k, (lo, hi) in intervals.items()}
        ci_metrics.update({f"{k}_ci_high": hi for k, (lo, hi) in intervals.items()})
        ci_metrics.update({"test_accuracy_exact_ci_low": exact[0], "test_accuracy_exact_ci_high": exact[1]})
        tracker.log_metrics(run_id, {**metrics, **ci_metrics})
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            matrix = confusion(labels, probs, len(spec.classes))
            save_confusion_matrix(matrix, spec.classes, tmp / "confusion_matrix.png",
                                  f"{version.name} v{version.version}: test confusion matrix")
            predictions = pd.DataFrame(probs, columns=[f"prob_{c}" for c in spec.classes])
            predictions.insert(0, "predicted", [spec.classes[i] for i in probs.argmax(1)])
            predictions.insert(0, "label", [spec.classes[i] for i in labels])
            predictions.insert(0, "path", split.parts[part])
            predictions.to_csv(tmp / "test_predictions.csv", index=False)
            (tmp / "metrics.json").write_text(json.dumps(
                {"metrics": metrics, "ci95_bootstrap": intervals, "accuracy_ci95_exact": exact}, indent=1))
            for name in ("confusion_matrix.png", "test_predictions.csv", "metrics.json"):
                tracker.log_artifact(run_id, tmp / name)
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    return Evaluation(run_id, model_uri, version.version, metrics, intervals, exact, len(labels))


def model_split(task: TaskSpec, tracker: Tracker, tags: dict, workdir: Path) -> tuple:
    """(dataset index, split) a registered model was trained under, from its version tags."""
    index = task.importer(Path(tags["data_root"]))
    split_file = _split_file(tracker, tags, tags.get("search_run_id"), workdir)
    return index, load_or_create_split(split_file, index, int(tags.get("split_seed", 0)))


def _split_file(tracker: Tracker, tags: dict, parent_run_id: str | None, workdir: Path) -> Path:
    """The split file the model was trained under: on disk, else the copy logged with the search."""
    path = Path(tags.get("split_file", ""))
    if path.is_file():
        return path
    if parent_run_id:
        target = Path(workdir) / "splits"
        target.mkdir(parents=True, exist_ok=True)
        return Path(tracker.client.download_artifacts(parent_run_id, f"split/{path.name}", str(target)))
    raise UserInputError(f"split file {path} of this model is missing")


SEGMENTATION_HEADLINE = ("test_dice", "test_pooled_dice", "test_jaccard")


def format_table(evaluation: Evaluation) -> str:
    rows = [f"{'metric':<40}{'value':>8}   95% CI (bootstrap)"]
    keys = [k for k in HEADLINE + SEGMENTATION_HEADLINE if k in evaluation.metrics]
    keys += sorted(k for k in evaluation.metrics if k.startswith(("test_f1_", "test_dice_", "test_pooled_dice_")))
    for key in keys:
        lo, hi = evaluation.intervals.get(key, (np.nan, np.nan))
        interval = f"[{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) else ""
        rows.append(f"{key:<40}{evaluation.metrics[key]:>8.4f}   {interval}")
        if key == "test_accuracy" and evaluation.exact_accuracy:
            lo, hi = evaluation.exact_accuracy
            rows.append(f"{'  (exact binomial CI)':<40}{'':>8}   [{lo:.4f}, {hi:.4f}]")
    if evaluation.output_dir is not None:
        rows.append(f"masks, overlays and pixel counts: {evaluation.output_dir}")
    return "\n".join(rows)
