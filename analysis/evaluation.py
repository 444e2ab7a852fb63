"""Held-out evaluation of a registered model: the only code that reads the test part.

The task's kind scores and logs (analysis/classification_evaluation.py, segmentation_evaluation.py);
this module finds what to score: the version, its split, or an external set.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from tune_cells.analysis.classification_evaluation import HEADLINE
from tune_cells.analysis.evaluation_common import Evaluation, EvaluationContext
from tune_cells.data.importers import class_name
from tune_cells.data.reader import SplitReader
from tune_cells.data.splits import Split, load_or_create_split
from tune_cells.errors import UserInputError
from tune_cells.logged_runs import LoggedVersion
from tune_cells.paths import WorkDir
from tune_cells.tasks import TaskSpec, registered_name
from tune_cells.tracking import Tracker

SEGMENTATION_HEADLINE = ("test_dice", "test_pooled_dice", "test_jaccard")
_TEST_LINE = "On the test part"
CALIBRATION = ("test_ece_before_temperature", "test_ece")


def evaluate_registered(task: TaskSpec, tracker: Tracker, model_uri: str, workdir: Path, n_boot: int = 1000,
                        external: Path | None = None) -> Evaluation:
    """Score a registered model on the test part it was trained beside, or on every image of an
    `external` dataset in the task's layout (classes matched by name)."""
    workdir = WorkDir.at(workdir)
    version = tracker.resolve_model(model_uri, task.name)
    lineage = LoggedVersion.of(version)
    predictor = tracker.load_classifier(model_uri)
    spec = predictor.spec
    parent_run_id = lineage.search_run_id or None

    if external is None:
        index, split = model_split(task, tracker, lineage, workdir)
        part, source = "test", {"split_file": split.path.name, "split_sha256": split.sha256}
    else:
        index = task.importer(Path(external))
        known = {class_name(name) for name in spec.classes}  # (a model from before names were NFC may hold NFD)
        unknown = [name for name in index.classes if class_name(name) not in known]
        if unknown:
            raise UserInputError(f"--data {index.root}: {task.kind.label_noun} {unknown[0]!r} is not one the model "
                                 f"knows ({', '.join(spec.classes)})")
        # the importer's groups (lung's animal, groups.csv): the bootstrap resamples them, as on the test part
        groups = None
        if "group" in index.items.columns:
            grouped = index.items.dropna(subset=["group"])
            groups = {str(name): sorted(rows["path"]) for name, rows in grouped.groupby("group")} or None
        split = Split(path=Path(external), parts={"external": list(index.items["path"])}, seed=0, groups=groups)
        part, source = "external", {"external_data": str(index.root)}
    reader = SplitReader(index, split, spec.channels, spec.store_size, workdir)
    experiment_id = evaluation_experiment(tracker, task, parent_run_id)
    run_name = f"{'external-' if external is not None else ''}evaluation-v{version.version}"
    evaluation = task.kind.evaluate(EvaluationContext(
        task=task, tracker=tracker, predictor=predictor, version=version, model_uri=model_uri, reader=reader,
        part=part, source=source, experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
        workdir=workdir, n_boot=n_boot))
    if external is None:  # the version's own test part: its card, and the summary on its search run
        from tune_cells.analysis.model_card import write_card

        write_card(tracker, version, evaluation.run_id)
        if parent_run_id and tracker.find_run(parent_run_id) is not None:
            summarize_on_search_run(tracker, parent_run_id, experiment_id, task, evaluation)
    return evaluation


def evaluation_experiment(tracker: Tracker, task: TaskSpec, parent_run_id: str | None) -> str:
    """The experiment an evaluation logs to: its model's search's, else the task's (made if absent).
    One deleted in the MLflow UI is refused before any scoring (or --seeds retraining), saying how to
    restore it: evaluate has no --experiment to name another (search's message offers one)."""
    from tune_cells.tracking_checks import deleted_experiment

    name = registered_name(task.name)
    found = (tracker.client.get_experiment(tracker.get_run(parent_run_id).info.experiment_id) if parent_run_id
             else tracker.client.get_experiment_by_name(name))
    if found is not None and found.lifecycle_stage == "deleted":
        raise UserInputError(deleted_experiment(tracker.tracking_uri, found.name, found.experiment_id,
                                                otherwise=", then evaluate again: it logs its run there"))
    return found.experiment_id if parent_run_id else tracker.experiment_id(name)


def summarize_on_search_run(tracker: Tracker, parent_run_id: str, experiment_id: str, task: TaskSpec,
                            evaluation: Evaluation) -> None:
    """The test scores of the search's model as the search run's metrics (the UI's runs table shows
    them on its row) and a line of its description, linking the evaluation run and its model card."""
    from tune_cells.tracking import NOTE_TAG

    headline = [k for k in HEADLINE + SEGMENTATION_HEADLINE + CALIBRATION if k in evaluation.metrics]
    tracker.log_metrics(parent_run_id, {k: evaluation.metrics[k] for k in headline})
    key = "test_" + task.metric.removeprefix("val_")
    key = key if key in evaluation.metrics else headline[0]
    low, high = evaluation.intervals.get(key, (np.nan, np.nan))
    interval = f" (95% CI {low:.4f} to {high:.4f})" if np.isfinite(low) else ""
    note = tracker.get_run(parent_run_id).data.tags.get(NOTE_TAG, "").split(_TEST_LINE)[0].rstrip()
    tracker.set_tags(parent_run_id, {NOTE_TAG: (
        f"{note}\n\n{_TEST_LINE} ({evaluation.n_images} images): {key} {evaluation.metrics[key]:.4f}{interval}. "
        f"Model card: `model_card.md` in the artifacts of [evaluation-v{evaluation.version}]"
        f"(#/experiments/{experiment_id}/runs/{evaluation.run_id}).").strip()})


def model_split(task: TaskSpec, tracker: Tracker, lineage: LoggedVersion, workdir: Path) -> tuple:
    """(dataset index, split) a registered model was trained under, from its version tags."""
    if not lineage.data_root:
        raise UserInputError(f"models:/{lineage.name}/{lineage.version} records no data it was trained on (no "
                             "data_root tag): `tune-cells evaluate` scores other labelled data with --data DIR")
    data_root = Path(lineage.data_root)
    if not data_root.is_dir():  # the importer's message would name a --data flag this command may not have
        raise UserInputError(f"{data_root}: the data this model was trained on is not there (moved or deleted?); "
                             "`tune-cells evaluate` scores other labelled data with --data DIR")
    index = task.importer(data_root)
    split_file = _split_file(tracker, lineage, WorkDir.at(workdir))
    return index, load_or_create_split(split_file, index, lineage.split_seed)


def _split_file(tracker: Tracker, lineage: LoggedVersion, workdir: WorkDir) -> Path:
    """The split file the model was trained under: on disk, else the copy logged with the search,
    put in the working folder's splits/ once it is fetched (a failure leaves nothing behind)."""
    path, parent_run_id = Path(lineage.split_file), lineage.search_run_id
    if path.is_file():
        return path
    logged = f"split/{path.name}"
    if parent_run_id:
        with tempfile.TemporaryDirectory(prefix="tune-cells-split-") as folder:
            fetched = tracker.download_artifact(parent_run_id, logged, folder)  # a failing store is raised
            if fetched is not None and fetched.is_file():
                workdir.splits.mkdir(parents=True, exist_ok=True)
                return Path(shutil.copyfile(fetched, workdir.splits / path.name))
        raise UserInputError(f"split file {path} of this model is missing, and its search run {parent_run_id} holds no "
                             f"copy ({logged}): put the file back to score the model on the part it was tested on")
    raise UserInputError(f"split file {path} of this model is missing")


def format_table(evaluation: Evaluation) -> str:
    rows = [f"{'metric':<40}{'value':>8}   95% CI (bootstrap)"]
    keys = [k for k in HEADLINE + SEGMENTATION_HEADLINE + CALIBRATION if k in evaluation.metrics]
    keys += sorted(k for k in evaluation.metrics if k.startswith(("test_f1_", "test_dice_", "test_pooled_dice_")))
    for key in keys:
        lo, hi = evaluation.intervals.get(key, (np.nan, np.nan))
        interval = f"[{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) else "none: too few groups" if evaluation.ci_note else ""
        rows.append(f"{key:<40}{evaluation.metrics[key]:>8.4f}   {interval}")
        if key == "test_accuracy" and evaluation.exact_accuracy:
            lo, hi = evaluation.exact_accuracy
            rows.append(f"{'  (exact binomial CI)':<40}{'':>8}   [{lo:.4f}, {hi:.4f}]")
    if evaluation.ci_note:
        rows.append(f"{evaluation.ci_note[:1].upper()}{evaluation.ci_note[1:]}.")
    if evaluation.output_dir is not None:
        rows.append(f"masks, overlays and pixel counts: {evaluation.output_dir}")
    return "\n".join(rows)
