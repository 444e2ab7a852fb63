"""`--warm-start` counts an initial point as tried only when an earlier trial ran it with the space's
fixed values as they are now: a lung recipe run before `batchnorm_views` was another recipe, and
skipping the new one would leave the one-SE rule nothing to prefer. Read from a real sqlite MLflow
store holding an earlier search, as `earlier_trials` reads it."""

from __future__ import annotations

from tune_cells.search_spaces import SearchSpace
from tune_cells.tracking import Tracker
from tune_cells.warm_start import earlier_trials

RECIPE = {"lr": 1.0e-3}


def earlier_search(tmp_path, space: SearchSpace, trials: list[dict]) -> Tracker:
    """A store with one finished search of `space` whose finished trials logged `trials` as params."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    experiment = tracker.experiment_id("tune-cells-lung")
    parent = tracker.start_run(experiment, "search-1", "search")
    tracker.log_params(parent, {"space": space.source})
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
    warm = earlier_trials(before, before.experiment_id("tune-cells-lung"), space, "lung", "val_dice", "max")
    assert warm.tried == [] and warm.untried([RECIPE]) == [RECIPE]
    assert warm.skipped == 2 and warm.trials == []  # nor do they reach the sampler: no points of the space now

    now = earlier_search(tmp_path / "now", space, [{"lr": 1.0e-3, "batchnorm_views": 96}])
    warm = earlier_trials(now, now.experiment_id("tune-cells-lung"), space, "lung", "val_dice", "max")
    assert warm.untried([RECIPE]) == [] and len(warm.trials) == 1 and warm.trials[0].value == 0.8
