"""Held-out evaluation of a classifier: metrics with bootstrap and exact CIs, a confusion matrix,
and every prediction, logged as an evaluation run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from tune_cells.analysis.calibration import expected_calibration_error
from tune_cells.analysis.evaluation_common import Evaluation, EvaluationContext, evaluation_run, interval_metrics
from tune_cells.analysis.metrics import bootstrap_intervals, classification_metrics, confusion, exact_accuracy_interval
from tune_cells.analysis.plots import save_confusion_matrix, save_reliability_diagram
from tune_cells.data.importers import class_name

HEADLINE = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc")


def evaluate_classifier(context: EvaluationContext) -> Evaluation:
    classifier, version, reader = context.predictor, context.version, context.reader
    spec = classifier.spec
    images, labels = reader.load(context.part, "evaluation")
    index_classes = reader.index.classes
    by_name = {class_name(name): i for i, name in enumerate(spec.classes)}  # matched by name, in one Unicode form
    labels = np.array([by_name[class_name(index_classes[i])] for i in labels], dtype=np.int64)
    probs = classifier.predict_proba(images)  # what predict and serving return
    uncalibrated = classifier.predict_proba(images, temperature=1.0)

    metrics = {**classification_metrics(labels, probs, spec.classes),
               "test_ece": expected_calibration_error(probs, labels),
               "test_ece_before_temperature": expected_calibration_error(uncalibrated, labels)}
    intervals = bootstrap_intervals(labels, probs, spec.classes, n_boot=context.n_boot, groups=context.groups)
    exact = exact_accuracy_interval(labels, probs, groups=context.groups)  # None for groups: not independent draws
    facts = context.bootstrap_facts()
    with evaluation_run(context) as run_id:
        context.tracker.log_params(run_id, context.params(len(labels), bootstrap_unit=facts["bootstrap_unit"],
                                                         bootstrap_units=facts["bootstrap_units"]))
        context.tracker.log_metrics(run_id, {
            **metrics, **interval_metrics(intervals),
            **({"test_accuracy_exact_ci_low": exact[0], "test_accuracy_exact_ci_high": exact[1]} if exact else {}),
        })
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            matrix = confusion(labels, probs, len(spec.classes))
            save_confusion_matrix(matrix, spec.classes, tmp / "confusion_matrix.png",
                                  f"{version.name} v{version.version}: test confusion matrix")
            save_reliability_diagram(uncalibrated, probs, labels, tmp / "reliability_diagram.png",
                                     f"{version.name} v{version.version}: test reliability (T={spec.temperature:.2f})")
            predictions = pd.DataFrame(probs, columns=[f"prob_{c}" for c in spec.classes])
            predictions.insert(0, "predicted", [spec.classes[i] for i in probs.argmax(1)])
            predictions.insert(0, "label", [spec.classes[i] for i in labels])
            predictions.insert(0, "path", context.paths)
            predictions.to_csv(tmp / "test_predictions.csv", index=False)
            (tmp / "metrics.json").write_text(json.dumps(
                {"metrics": metrics, "ci95_bootstrap": intervals or None, "accuracy_ci95_exact": exact, **facts},
                indent=1))
            for name in ("confusion_matrix.png", "reliability_diagram.png", "test_predictions.csv", "metrics.json"):
                context.tracker.log_artifact(run_id, tmp / name)
    return Evaluation(run_id, context.model_uri, version.version, metrics, intervals, exact, len(labels),
                      ci_note=facts["ci_note"])


class ClassificationScorer:
    """Test-part scores of any classifier of the task; the test part is decoded once."""

    keys = list(HEADLINE)

    def __init__(self, reader, n_boot: int):
        self.n_boot = n_boot
        self.images, self.labels = reader.load("test", "evaluation")
        self.groups = reader.split.units("test")

    def score(self, predictor, with_intervals: bool = False) -> tuple[dict, dict]:
        classes = predictor.spec.classes
        probs = predictor.predict_proba(self.images)
        scores = classification_metrics(self.labels, probs, classes)
        intervals = bootstrap_intervals(self.labels, probs, classes, n_boot=self.n_boot,
                                        groups=self.groups) if with_intervals else {}
        return scores, intervals
