"""Held-out evaluation of a registered segmentation model: full-size stitched masks against the truth.

Writes, per test image, the predicted masks and an overlay PNG, and one CSV row with each target's
pixel count and percentage (predicted and true) and its Dice, like the LungNeuralNet table; all of
it lands in `<workdir>/evaluations/<model>-v<version>-<run>/` and in the evaluation run's artifacts.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from tune_cells.analysis.evaluation_common import Evaluation, EvaluationContext, evaluation_run, interval_metrics
from tune_cells.analysis.metrics import bootstrap_units, resample, too_few_groups
from tune_cells.analysis.segmentation_metrics import segmentation_scores
from tune_cells.data.importers import class_name
from tune_cells.segmentation import write_predictions

log = logging.getLogger(__name__)


def bootstrap_over_images(rows: list[dict], targets: list[str], n_images: int, n_boot: int,
                          seed: int = 0, groups=None) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of the per-image mean Dice (each target and their mean), resampling
    images, or whole groups (`groups`: a label per image, e.g. the animal; fewer than
    MIN_GROUPS_FOR_CI groups: no intervals)."""
    units = bootstrap_units(groups)
    if n_images < 2 or too_few_groups(groups):
        return {}
    dice = np.array([[next(r["dice"] for r in rows if r["image"] == i and r["target"] == t) for t in targets]
                     for i in range(n_images)])
    rng = np.random.default_rng(seed)
    if units is None:
        samples = dice[rng.integers(0, n_images, size=(n_boot, n_images))].mean(1)  # n_boot × T
    else:
        samples = np.stack([dice[resample(rng, n_images, units)].mean(0) for _ in range(n_boot)])
    intervals = {f"test_dice_{t}": tuple(np.percentile(samples[:, k], [2.5, 97.5])) for k, t in enumerate(targets)}
    intervals["test_dice"] = tuple(np.percentile(samples.mean(1), [2.5, 97.5]))
    return {k: (float(lo), float(hi)) for k, (lo, hi) in intervals.items()}


def evaluate_segmenter(context: EvaluationContext) -> Evaluation:
    segmenter, version, reader = context.predictor, context.version, context.reader
    images, truths = reader.load_segmentation(context.part, "evaluation")
    model_targets = segmenter.targets
    # An external set may hold a subset of the model's targets (matched by name): score those.
    in_data = {class_name(t): i for i, t in enumerate(reader.index.classes)}  # matched in one Unicode form
    targets = [t for t in model_targets if class_name(t) in in_data]
    columns = [model_targets.index(t) for t in targets]
    truths = [truth[[in_data[class_name(t)] for t in targets]] for truth in truths]
    predicted = [segmenter.predict_masks(image) for image in images]
    metrics, rows = segmentation_scores(truths, [p[columns] for p in predicted], targets, "test_")
    intervals = bootstrap_over_images(rows, targets, len(images), context.n_boot, groups=context.groups)
    facts = context.bootstrap_facts()

    names = context.paths
    with evaluation_run(context) as run_id:
        output_dir = context.workdir.evaluation(version.name, version.version, run_id)
        table = write_predictions(segmenter, names, images, predicted, output_dir)
        for k, target in enumerate(targets):
            table[f"truth_pixels_{target}"] = [int(t[k].sum()) for t in truths]
            table[f"truth_percent_{target}"] = [round(100.0 * t[k].mean(), 3) for t in truths]
            table[f"dice_{target}"] = [r["dice"] for r in rows if r["target"] == target]
        table.to_csv(output_dir / "pixel_counts.csv", index=False)
        scores = pd.DataFrame(rows)
        scores.insert(1, "path", [names[i] for i in scores["image"]])
        scores.drop(columns="image").to_csv(output_dir / "per_image_scores.csv", index=False)
        (output_dir / "metrics.json").write_text(json.dumps(
            {"metrics": metrics, "ci95_bootstrap_over_images": intervals or None, **facts,
             "convention": "both empty: dice 1; empty truth with predicted pixels: dice 0 (pixels reported)"},
            indent=1))
        context.tracker.log_params(run_id, context.params(len(images), targets=",".join(targets),
                                                         bootstrap_unit=facts["bootstrap_unit"],
                                                         bootstrap_units=facts["bootstrap_units"]))
        context.tracker.log_metrics(run_id, {**metrics, **interval_metrics(intervals)})
        context.tracker.log_artifact(run_id, output_dir, "evaluation")
    return Evaluation(run_id, context.model_uri, version.version, metrics, intervals, None, len(images), output_dir,
                      ci_note=facts["ci_note"])


class SegmentationScorer:
    """Test-part Dice of any segmenter of the task; the test part is decoded once."""

    def __init__(self, reader, n_boot: int):
        self.n_boot = n_boot
        self.images, self.truths = reader.load_segmentation("test", "evaluation")
        self.targets = list(reader.index.classes)
        self.groups = reader.split.units("test")
        self.keys = ["test_dice", "test_pooled_dice", *[f"test_dice_{t}" for t in self.targets]]

    def score(self, predictor, with_intervals: bool = False) -> tuple[dict, dict]:
        predicted = [predictor.predict_masks(image) for image in self.images]
        scores, rows = segmentation_scores(self.truths, predicted, self.targets, "test_")
        intervals = bootstrap_over_images(rows, self.targets, len(self.images), self.n_boot,
                                          groups=self.groups) if with_intervals else {}
        return scores, intervals
