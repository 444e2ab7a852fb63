"""The typed views of what a search logs (`tune_cells.logged_runs`), read from real MLflow runs
and a registered version on sqlite: the logged strings come back typed, and a run that never
logged a key (an older version's) reads as the default that stands for it."""

from __future__ import annotations

from tune_cells.logged_runs import LoggedSearch, LoggedTrial, LoggedVersion
from tune_cells.search_options import SearchOptions
from tune_cells.tracking import Tracker


def test_logged_strings_come_back_typed_and_missing_keys_read_as_their_defaults(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts")
    experiment = tracker.experiment_id("views")
    search = tracker.start_run(experiment, "search-new", "search", tags={
        "task": "nuclei", "split_file": "nuclei-0.json", "split_sha256": "abc", "ray_experiment": "search-new",
        "resumes": "2", "best_trial_id": "t1", "selection": "the one-SE rule", "latency_budget_ms": "2.5"})
    tracker.log_params(search, {"metric": "val_dice", "mode": "max", "max_epochs": 7, "folds": 3,
                                "classes": "a,b", "space": "lung.yaml"})
    old = tracker.start_run(experiment, "search-old", "search")
    trial = tracker.start_run(experiment, "t1", "trial", search, tags={
        "ray_trial_id": "t1", "seed": "107", "stopped_by_time_budget": "true", "latency_device": "cpu"})
    bare = tracker.start_run(experiment, "t2", "trial", search)

    new, before = LoggedSearch.of(tracker.get_run(search)), LoggedSearch.of(tracker.get_run(old))
    assert (new.task, new.metric, new.max_epochs, new.folds, new.resumes, new.latency_budget_ms) == (
        "nuclei", "val_dice", 7, 3, 2, 2.5)
    assert (new.classes, new.space, new.split_file, new.ray_experiment, new.selection) == (
        "a,b", "lung.yaml", "nuclei-0.json", "search-new", "the one-SE rule")
    assert (before.metric, before.max_epochs, before.folds, before.resumes, before.latency_budget_ms) == (
        None, SearchOptions.max_epochs, SearchOptions.folds, 0, None)
    assert before.best_trial_id == before.ray_experiment == before.task == ""

    logged, unnamed = LoggedTrial.of(tracker.get_run(trial)), LoggedTrial.of(tracker.get_run(bare))
    assert (logged.parent_run_id, logged.ray_trial_id, logged.seed, logged.stopped_by_time_budget) == (
        search, "t1", 107, True)
    assert not logged.stopped_early and logged.latency_device == "cpu"
    assert (unnamed.ray_trial_id, unnamed.seed, unnamed.stopped_by_time_budget, unnamed.failure) == ("", None, False, "")

    tracker.client.create_registered_model("views-model")
    version = tracker.client.create_model_version("views-model", "file:///nowhere", tags={
        "task": "lung", "search_run_id": search, "ensemble_seeds": "0,100", "split_seed": "4"})
    lineage = LoggedVersion.of(tracker.client.get_model_version("views-model", version.version))
    assert (lineage.name, lineage.version, lineage.task, lineage.search_run_id) == ("views-model", "1", "lung", search)
    assert (lineage.ensemble_seeds, lineage.ensemble_trials, lineage.split_seed, lineage.latency_budget_ms) == (
        [0, 100], False, 4, None)
