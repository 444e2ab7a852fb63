"""After an interrupted search is resumed, no trial run stays RUNNING: a run whose trial Ray
finished takes that trial's status; one Ray's state snapshot never held (started just before the
kill) ends KILLED and says why, and is hidden (soft-deleted) only if it never reported an epoch.
Real MLflow on sqlite."""

from __future__ import annotations

from tune_cells.tracking import Tracker


def test_runs_ray_lost_end_killed_and_say_why_and_an_empty_one_is_hidden(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts")
    experiment = tracker.experiment_id("orphans")
    parent = tracker.start_run(experiment, "search", "search")
    runs = {trial: tracker.start_run(experiment, trial, "trial", parent, tags={"ray_trial_id": trial})
            for trial in ("done", "broken", "lost-with-epoch", "lost-empty")}
    tracker.log_metrics(runs["lost-with-epoch"], {"val_loss": 0.7}, step=1)

    tracker.end_orphaned_trial_runs(experiment, parent, {"done": False, "broken": True})

    status = {trial: tracker.get_run(run_id).info for trial, run_id in runs.items()}
    assert status["done"].status == "FINISHED" and status["broken"].status == "FAILED"
    assert status["lost-with-epoch"].status == "KILLED" and status["lost-with-epoch"].lifecycle_stage == "active"
    assert tracker.get_run(runs["lost-with-epoch"]).data.tags["failure"] == "lost when the search was interrupted"
    assert status["lost-empty"].status == "KILLED" and status["lost-empty"].lifecycle_stage == "deleted"
    assert {r.info.run_id for r in tracker.trial_children(experiment, parent)} == {
        runs["done"], runs["broken"], runs["lost-with-epoch"]}
