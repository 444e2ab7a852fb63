"""The model card of a registered version, written with each evaluation on its test part.

After Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019): model details, intended use,
data, metrics with their uncertainty, and limits in plain words; the JSON beside it follows MONAI
bundle metadata (network_data_format, intended_use, references). Everything is read back from
MLflow (the version, its search run, its best trial, the evaluation run), so the card's numbers are
the evaluation run's logged metrics and a card can be rebuilt for any evaluated version.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from tune_cells.analysis.model_card_text import REFERENCES, CardFacts, metric_rows, render_markdown
from tune_cells.errors import UserInputError
from tune_cells.logged_runs import RUN_TYPE_TAG, LoggedSearch, LoggedVersion

log = logging.getLogger(__name__)

CARD_FILE, CARD_JSON = "model_card.md", "model_card.json"
CARD_TAG = "model_card"  # on the version: runs:/<evaluation run id>/model_card.md


def write_card(tracker, version, evaluation_run_id: str) -> str:
    """Build the card of `version` from its evaluation run, log it (Markdown and JSON) with that run
    and point the version at it (tag `model_card`); returns the Markdown."""
    facts = gather(tracker, version, tracker.get_run(evaluation_run_id))
    text = render_markdown(facts)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CARD_FILE).write_text(text)
        (Path(tmp) / CARD_JSON).write_text(json.dumps(metadata(facts), indent=1))
        tracker.log_artifact(evaluation_run_id, Path(tmp) / CARD_FILE)
        tracker.log_artifact(evaluation_run_id, Path(tmp) / CARD_JSON)
    tracker.set_version_tags(version.name, version.version, {CARD_TAG: f"runs:/{evaluation_run_id}/{CARD_FILE}"})
    return text


def find_card(tracker, version) -> str:
    """The card of `version`: the one its latest evaluation logged, else one built from the latest
    evaluation on its test part (evaluated before cards were written)."""
    pointer = version.tags.get(CARD_TAG, "")
    if pointer.startswith("runs:/"):
        run_id, _, path = pointer[len("runs:/"):].partition("/")
        card = tracker.artifact_text(run_id, path)  # a failing store is raised
        if card is not None:
            return card
        log.warning("the card %s of %s version %s is gone (its run or file deleted); building it again",
                    pointer, version.name, version.version)
    run = latest_evaluation(tracker, version)
    if run is None:
        raise UserInputError(f"models:/{version.name}/{version.version} has no evaluation on its test part yet: run "
                             f"`tune-cells evaluate {LoggedVersion.of(version).task or 'TASK'} --model-uri "
                             f"models:/{version.name}/{version.version}` first")
    return render_markdown(gather(tracker, version, run))


def latest_evaluation(tracker, version):
    """The latest finished evaluation run of `version` on its test part (not a seeds run), or None."""
    search_run_id = LoggedVersion.of(version).search_run_id
    search = tracker.find_run(search_run_id) if search_run_id else None
    experiments = [search.info.experiment_id] if search is not None else [
        e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(
        experiments, f"tags.`{RUN_TYPE_TAG}` = 'evaluation' and tags.evaluation_data = 'test' and "
        f"tags.model_version = '{version.version}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if "evaluation_kind" not in r.data.tags
                 and r.data.params.get("model_name", version.name) == version.name), None)


def gather(tracker, version, evaluation) -> CardFacts:
    from tune_cells.tasks import get_task

    tags, lineage = version.tags, LoggedVersion.of(version)
    task = lineage.task
    search = tracker.find_run(lineage.search_run_id) if lineage.search_run_id else None
    trial = tracker.find_run(lineage.trial_run_id) if lineage.trial_run_id else None
    data, space = {}, ""
    if search is not None:
        data = json.loads(tracker.artifact_text(search.info.run_id, "data_summary.json") or "{}")
        space = tracker.artifact_text(search.info.run_id, "search_space.yaml") or ""
    try:
        spec = get_task(task)
        description, wording = spec.description, spec.kind.card_wording
    except UserInputError:  # a task this version does not know: a classifier's words
        description, wording = "", None
    info = search.info if search is not None else None
    return CardFacts(
        task=task, task_description=description, model_name=version.name, version=str(version.version),
        version_tags=dict(tags), evaluation_run_id=evaluation.info.run_id,
        evaluation_time=_iso(evaluation.info.start_time), metrics=dict(evaluation.data.metrics),
        evaluation_params=dict(evaluation.data.params), search_run_id=info.run_id if info else "",
        search_name=info.run_name if info else "", search_params=dict(search.data.params) if search else {},
        search_metrics=dict(search.data.metrics) if search else {},
        search_seconds=(info.end_time - info.start_time) / 1000 if info and info.end_time else None,
        data=data, space_yaml=space, config=dict(trial.data.params) if trial is not None else {},
        experiment_id=evaluation.info.experiment_id, wording=wording,
        selection=LoggedSearch.of(search).selection if search else "",
        search_resumes=LoggedSearch.of(search).resumes if search else 0,
    )


def metadata(facts: CardFacts) -> dict:
    """The card as data, in the shape of MONAI bundle metadata where a field fits."""
    params, tags = facts.search_params, facts.version_tags
    classes = params.get("classes", "").split(",") if params.get("classes") else []
    return {
        "name": facts.model_name, "version": facts.version, "model_uri": facts.model_uri, "task": facts.task,
        "description": facts.task_description, "evaluation_run_id": facts.evaluation_run_id,
        "evaluated": facts.evaluation_time, "search_run_id": facts.search_run_id,
        "network_data_format": {
            "inputs": {"image": {"num_channels": len(facts.data.get("train_channel_mean") or []) or None,
                                 "spatial_shape": [_int(facts.config.get("image_size"))] * 2,
                                 "normalisation": {"mean": facts.data.get("train_channel_mean"),
                                                   "std": facts.data.get("train_channel_std")}}},
            "outputs": {"pred": {"classes": classes, "temperature": _float(tags.get("temperature")),
                                 "test_time_augmentation": tags.get("tta")}},
        },
        "data": {"root": facts.data.get("root", tags.get("data_root")), "source": facts.data.get("source"),
                 "counts": facts.data.get("counts"), "split_file": tags.get("split_file"),
                 "split_sha256": tags.get("split_sha256"), "grouping": facts.data.get("grouping"),
                 "left_out": len(facts.data.get("excluded", [])),
                 "near_duplicates_across_parts": _int(params.get("near_duplicates_across_splits"))},
        "search": {key: params.get(key) for key in ("space", "samples", "max_epochs", "grace_period",
                                                    "reduction_factor", "time_budget", "seed", "folds", "metric",
                                                    "mode")}
        | {"trials": facts.search_metrics.get("trials"), "seconds": facts.search_seconds},
        "configuration": facts.config,
        "test_metrics": {key: {"value": value, "ci95": [low, high] if low is not None else None}
                         for key, value, low, high in metric_rows(facts.metrics)},
        "references": REFERENCES,
    }


def _iso(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
