"""`--warm-start` counts an initial point as tried only when an earlier trial ran it with the space's
fixed values as they are now: a lung recipe run before `batchnorm_views` was another recipe, and
skipping the new one would leave the one-SE rule nothing to prefer. Read from a real sqlite MLflow
store holding an earlier search, as `earlier_trials` reads it."""

from __future__ import annotations

import logging

from tune_cells.search_spaces import SearchSpace
from tune_cells.tracking import Tracker
from tune_cells.warm_start import earlier_trials

RECIPE = {"lr": 1.0e-3}


LUNG = ["lung"]  # its one segmentation target


def earlier_search(tmp_path, space: SearchSpace, trials: list[dict], task: str = "lung", classes: list[str] = LUNG,
                   experiment: str = "tune-cells-lung") -> Tracker:
    """A store with one more finished search of `space` (on `task`, `classes`, as a search tags and logs
    them) whose finished trials logged `trials` as params."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    experiment = tracker.experiment_id(experiment)
    parent = tracker.start_run(experiment, "search-1", "search", tags={"task": task})
    tracker.log_params(parent, {"space": space.source, "task": task, "classes": ",".join(classes)})
    for number, params in enumerate(trials):
        run = tracker.start_run(experiment, f"trial-{number}", "trial", parent_run_id=parent)
        tracker.log_params(run, params)
        tracker.log_metrics(run, {"val_dice": 0.8 + number / 100})
        tracker.end_run(run, "FINISHED")
    tracker.end_run(parent, "FINISHED")
    return tracker


def test_a_recipe_run_under_other_fixed_values_is_not_tried_and_one_under_the_current_ones_is(tmp_path):
    space = SearchSpace({"lr": {"float": [3.0e-4, 3.0e-3], "log": True}, "batchnorm_views": 96},
                        str(tmp_path / "lung.yaml"), initial_points=[RECIPE])
    before = earlier_search(tmp_path / "before", space, [{"lr": 1.0e-3}, {"lr": 1.0e-3, "batchnorm_views": 0}])
    warm = earlier_trials(before, before.experiment_id("tune-cells-lung"), space, "lung", "val_dice", "max", LUNG)
    assert warm.tried == [] and warm.untried([RECIPE]) == [RECIPE]
    assert warm.skipped == 2 and warm.trials == []  # nor do they reach the sampler: no points of the space now

    now = earlier_search(tmp_path / "now", space, [{"lr": 1.0e-3, "batchnorm_views": 96}])
    warm = earlier_trials(now, now.experiment_id("tune-cells-lung"), space, "lung", "val_dice", "max", LUNG)
    assert warm.untried([RECIPE]) == [] and len(warm.trials) == 1 and warm.trials[0].value == 0.8


def test_only_searches_of_the_same_task_and_classes_are_given_and_the_rest_is_said(tmp_path, caplog):
    """A nuclei experiment that also holds a 3-class folder search (--experiment names any one): each
    warm-starts from its own only (0.5 balanced accuracy is chance on 2 classes, good on 10), and a
    search with nothing alike, or in a new experiment, starts cold saying why in one line."""
    space = SearchSpace({"lr": {"float": [1.0e-4, 1.0e-2], "log": True}}, str(tmp_path / "nuclei-scratch.yaml"))
    nuclei = ["normal_epithelial", "cancer_epithelial", "muscle", "immune"]
    store = tmp_path / "store"
    earlier_search(store, space, [{"lr": 1.0e-3}] * 4, "nuclei", nuclei, "tune-cells-nuclei-demo")
    tracker = earlier_search(store, space, [{"lr": 2.0e-3}], "folder", ["a", "b", "c"], "tune-cells-nuclei-demo")
    experiment = tracker.experiment_id("tune-cells-nuclei-demo")

    def warm_start(task, classes, experiment=experiment):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tune_cells.warm_start"):
            warm = earlier_trials(tracker, experiment, space, task, "val_dice", "max", classes)
        return [t.params["lr"] for t in warm.trials], [r.getMessage() for r in caplog.records]

    given, said = warm_start("folder", ["a", "b", "c"])
    assert given == [2.0e-3]
    assert ("warm start: 1 earlier search(es) in experiment tune-cells-nuclei-demo of another task or classes left "
            "out: nuclei (normal_epithelial, cancer_epithelial, muscle, immune)") in said
    given, said = warm_start("nuclei", nuclei)
    assert given == [1.0e-3] * 4 and "left out: folder (a, b, c)" in said[0]
    given, said = warm_start("folder", ["a", "b"])  # a class folder removed since
    assert given == [] and said == [
        "warm start: none of the 2 earlier searches in experiment tune-cells-nuclei-demo is of folder (a, b): they "
        "searched folder (a, b, c); nuclei (normal_epithelial, cancer_epithelial, muscle, immune); the search starts "
        "cold"]
    given, said = warm_start("folder", ["a", "b", "c"], tracker.experiment_id("typo"))  # made by the search
    assert given == [] and said == ["warm start: experiment typo has no earlier searches (a new experiment?): the "
                                    "search starts cold"]


def test_trials_from_before_a_space_set_ensemble_are_its_points(tmp_path):
    """`ensemble` is read at promotion only: trials logged before a space fixed it (or under another
    value) trained exactly as now, so they still warm-start the sampler and count the recipe as tried."""
    space = SearchSpace({"lr": {"float": [3.0e-4, 3.0e-3], "log": True}, "ensemble": 2},
                        str(tmp_path / "lung.yaml"), initial_points=[RECIPE])
    store = earlier_search(tmp_path, space, [{"lr": 1.0e-3}, {"lr": 2.0e-3, "ensemble": 1}])
    warm = earlier_trials(store, store.experiment_id("tune-cells-lung"), space, "lung", "val_dice", "max", LUNG)
    assert warm.skipped == 0 and len(warm.trials) == 2 and warm.untried([RECIPE]) == []
