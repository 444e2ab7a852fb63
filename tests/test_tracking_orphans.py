"""After an interrupted search is resumed, no trial run stays RUNNING: a run whose trial Ray
finished takes that trial's status; one Ray's state snapshot never held (started just before the
kill) ends KILLED and says why, and is hidden (soft-deleted) only if it never reported an epoch.
Likewise an ensemble's retrain runs left by a killed promotion, whether it is retrained or not. Real
MLflow on sqlite."""

from __future__ import annotations

import pytest

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


def test_a_retraining_redone_by_a_resumed_promotion_leaves_one_run_per_ensemble_member(tmp_path):
    """An ensemble's retrains are recorded as trials are (events as Ray's callback sends them): an
    interrupted retraining ends its unfinished run KILLED; the resumed promotion, retraining again,
    supersedes (soft-deletes) the first attempt's runs, finished or not: one run per member."""
    from tune_cells.trial_recorder import ENSEMBLE_MEMBER, TrialRecorder, recording_retrains, retrain_runs_by_seed

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts")
    experiment = tracker.experiment_id("retrains")
    parent = tracker.start_run(experiment, "search", "search")
    trials = TrialRecorder(tracker, experiment, parent, 2, ("val_loss",), common_tags={"split_sha256": "abc"})
    champion = {"retrain_of_trial_run_id": "champion-run", "retrain_of_ray_trial_id": "t0"}

    def train(recorder, trial_id: str, seed: int, epochs: int) -> None:
        recorder.on_trial_start(trial_id, f"train_{trial_id}", {"lr": 0.01, "seed": seed})
        for epoch in range(1, epochs + 1):
            recorder.on_trial_result(trial_id, {"val_loss": 1.0 / epoch, "training_iteration": epoch})
        if epochs == 2:
            recorder.on_trial_end(trial_id, False, {"training_iteration": epochs}, None)

    with pytest.raises(KeyboardInterrupt):  # seed 107 finished, seed 207 cut off by Ctrl-C
        with recording_retrains(trials, ENSEMBLE_MEMBER, champion, supersede_earlier=True) as first:
            train(first, "a1", 107, 2)
            train(first, "a2", 207, 1)
            raise KeyboardInterrupt
    assert [tracker.get_run(first.runs[t]).info.status for t in ("a1", "a2")] == ["FINISHED", "KILLED"]

    with recording_retrains(trials, ENSEMBLE_MEMBER, champion, supersede_earlier=True) as second:
        train(second, "b1", 107, 2)
        train(second, "b2", 207, 2)

    members = tracker.retrain_children(experiment, parent, ENSEMBLE_MEMBER, finished_only=True)
    assert retrain_runs_by_seed(members) == {107: second.runs["b1"], 207: second.runs["b2"]} and len(members) == 2
    for earlier in first.runs.values():
        run = tracker.get_run(earlier)
        assert run.info.lifecycle_stage == "deleted" and run.info.status != "RUNNING" and run.data.tags["superseded"]
    member = tracker.get_run(second.runs["b1"])
    assert member.info.run_name == "ensemble-member-seed107" and member.data.params == {"lr": "0.01", "seed": "107"}
    assert {k: member.data.tags[k] for k in ("tune_cells.run_type", "retrain_purpose", "seed", "mlflow.parentRunId",
                                             "retrain_of_trial_run_id", "split_sha256", "epochs_run")} == {
        "tune_cells.run_type": "retrain", "retrain_purpose": "ensemble_member", "seed": "107",
        "mlflow.parentRunId": parent, "retrain_of_trial_run_id": "champion-run", "split_sha256": "abc", "epochs_run": "2"}
    assert [m.step for m in tracker.metric_history(member.info.run_id, "val_loss")] == [1, 2]
    assert list(tracker.trial_children(experiment, parent)) == []  # a retrain is no trial: the search's counts stay
    from tune_cells.analysis.promotion import _supersede_unused_members

    _supersede_unused_members(tracker, parent)  # resumed once more, now without an ensemble (--max-latency-ms)
    assert tracker.retrain_children(experiment, parent, ENSEMBLE_MEMBER) == []
    assert all(tracker.get_run(run).info.status != "RUNNING" for run in second.runs.values())
