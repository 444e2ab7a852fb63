"""After the trials: register the best trial's best checkpoint, point `champion` at it, pin its
configuration, and hand over to evaluation in a fresh process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tune_cells.paths import WorkDir


@dataclass
class SearchOutcome:
    task: str
    workdir: WorkDir
    metric: str
    experiment: str
    parent_run_id: str
    model_name: str
    model_version: str
    best_trial_id: str
    best_metric: float
    best_epoch: int
    best_config: dict
    trials: int
    failed_trials: int
    stopped_early: int
    wall_time_s: float
    tracking_uri: str
    best_config_file: Path


def promote(tracker, parent: str, prep, split, result, trial_runs: dict[str, str], max_epochs: int) -> SearchOutcome:
    """Register the search's best checkpoint (`prep`: the PreparedSearch, `result`: Ray's SearchResult)."""
    task = prep.task
    best_run = trial_runs.get(result.best_trial_id, "")
    version = tracker.log_model(best_run or parent, result.best_checkpoint, prep.model_name, tags={
        "task": task.name, "search_run_id": parent, "trial_run_id": best_run, "ray_trial_id": result.best_trial_id,
        "epoch": result.best_epoch, task.metric: f"{result.best_metric:.6f}", "data_root": str(prep.index.root),
        "split_file": str(split.path), "split_seed": split.seed, "split_sha256": split.sha256,
    }, signature=task.kind.signature(list(prep.index.classes)))
    previous = tracker.promote(prep.model_name, version)
    shutil.rmtree(result.best_checkpoint, ignore_errors=True)
    failed = sum(t.failed for t in result.trials)
    stopped = sum(1 for t in result.trials if not t.failed and t.iterations < max_epochs)
    tracker.log_metrics(parent, {f"best_{task.metric}": result.best_metric, "trials_failed": failed,
                                 "trials_stopped_early": stopped, "trials": len(result.trials),
                                 "searcher_trials": result.searcher_trials})
    tracker.set_tags(parent, {"best_trial_id": result.best_trial_id, "best_trial_run_id": best_run,
                              "model_name": prep.model_name, "model_version": version,
                              "previous_champion": previous or "", "ray_experiment_path": result.experiment_path})
    best_config_file = export_best_config(prep, parent, result)
    tracker.log_artifact(parent, best_config_file)
    tracker.end_run(parent)
    return SearchOutcome(
        task=task.name, workdir=prep.workdir, metric=task.metric, experiment=prep.experiment, parent_run_id=parent,
        model_name=prep.model_name, model_version=version, best_trial_id=result.best_trial_id,
        best_metric=result.best_metric, best_epoch=result.best_epoch, best_config=result.best_config,
        trials=len(result.trials), failed_trials=failed, stopped_early=stopped, wall_time_s=0.0,
        tracking_uri=tracker.tracking_uri, best_config_file=best_config_file,
    )


def export_best_config(prep, parent: str, result) -> Path:
    """The champion's configuration as a pinned space (every parameter fixed): `--space` reruns it."""
    import yaml

    path = prep.workdir.best_config(prep.experiment, parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = (f"Pinned best configuration of search run {parent} ({prep.experiment}): trial "
                   f"{result.best_trial_id}, {prep.task.metric} {result.best_metric:.4f} at epoch {result.best_epoch}.")
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in sorted(result.best_config.items())}
    path.write_text(yaml.safe_dump({"description": description, "params": params}, sort_keys=False))
    return path


def evaluate_in_fresh_process(outcome: SearchOutcome) -> int:
    """Evaluate the promoted version in a new interpreter: it must stand on what the registry holds."""
    command = [sys.executable, "-m", "tune_cells", "evaluate", outcome.task,
               "--model-uri", f"models:/{outcome.model_name}/{outcome.model_version}",
               "--workdir", str(outcome.workdir.root), "--tracking-uri", outcome.tracking_uri]
    return subprocess.call(command)
