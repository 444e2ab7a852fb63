"""Reliability with the real parts: kill -9 a running search and resume it; kill a trial's worker
and let Ray retry it. MLflow must end with exactly one run per trial under one parent."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tune_cells.live_study import open_journal

from conftest import short_tmpdir, store_client

pytestmark = pytest.mark.slow

SPACE = """
params:
  model: small_convnet
  depth: 2
  width: {choices: [12, 16]}
  optimizer: adamw
  lr: {float: [1.0e-3, 5.0e-3], log: true}
  batch_size: 32
  image_size: 40
"""
SAMPLES, EPOCHS = 4, 4
ARGS = ["search", "nuclei", "--samples", str(SAMPLES), "--max-epochs", str(EPOCHS), "--grace-period", str(EPOCHS),
        "--max-concurrent", "1", "--space", "space.yaml", "--workdir", "w", "--no-evaluate"]


def start(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / f"search{len(list(root.glob('search*.log')))}.log", "w")
    # Its own session: the driver, and the Ray processes it starts, can be killed together.
    return subprocess.Popen([sys.executable, "-m", "tune_cells", *ARGS, *extra], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def trial_statuses(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute(
                "select r.status from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'tune_cells.run_type' and t.value = 'trial' and r.lifecycle_stage = 'active'").fetchall()
    except sqlite3.Error:  # not created yet, or locked by the writer
        return []
    return [status for (status,) in rows]


def reported_running_trials(db: Path) -> list[str]:
    """Ray trial ids of the RUNNING trial runs that have logged a validation loss."""
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute(
                "select t.value from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'ray_trial_id' and r.status = 'RUNNING' and exists "
                "(select 1 from metrics m where m.run_uuid = r.run_uuid and m.key = 'val_loss')").fetchall()
    except sqlite3.Error:
        return []
    return [trial_id for (trial_id,) in rows]


def in_ray_snapshot(ray_storage: Path, trial_id: str) -> bool:
    """Whether Ray's latest saved experiment state (what --resume restores) holds the trial."""
    for state in ray_storage.glob("*/*/experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]  # [trial JSON, its runtime JSON] each
        except (OSError, ValueError, KeyError):  # being written
            continue
        if any(json.loads(trial_json).get("trial_id") == trial_id for trial_json, _runtime in trials):
            return True
    return False


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError("timed out")


def kill_session(session_id: int) -> None:
    """SIGKILL every process of the session: the driver, raylet, GCS, and Ray's workers."""
    for _ in range(3):
        for line in subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.splitlines():
            pid, sid = map(int, line.split())
            if sid == session_id:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)


def runs_of(root: Path):
    client = store_client(root / 'w' / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    runs = client.search_runs([experiment.experiment_id])
    kind = lambda k: [r for r in runs if r.data.tags.get("tune_cells.run_type") == k]  # noqa: E731
    return client, kind("search"), kind("trial")


def trial_workers(session_leader: int) -> list[int]:
    """Ray's trial worker processes of the search whose session `session_leader` leads."""
    found = subprocess.run(["pgrep", "-s", str(session_leader), "-f", "ray::ImplicitFunc"], capture_output=True,
                           text=True).stdout.split()
    return [int(pid) for pid in found]


def test_kill_9_and_resume_gives_one_run_per_trial_and_a_champion(tmp_path):
    """Also a trial's worker killed in the resumed search: Ray retries the trial from its last
    checkpoint and the search finishes (one search for both faults)."""
    (tmp_path / "space.yaml").write_text(SPACE)
    first = start(tmp_path)
    db = tmp_path / "w" / "mlflow.db"
    wait_for(lambda: "FINISHED" in trial_statuses(db) and "RUNNING" in trial_statuses(db))
    # Kill once the running trial has reported an epoch (a checkpoint to resume from) and Ray's
    # state snapshot holds it. A trial killed before any snapshot held it is a different case: Ray
    # never ran it on, and its run ends KILLED as lost (tests/test_tracking_orphans.py covers that).
    wait_for(lambda: any(in_ray_snapshot(tmp_path / "w" / "ray", t) for t in reported_running_trials(db)))
    kill_session(first.pid)
    first.wait()
    assert first.returncode == -signal.SIGKILL

    second = start(tmp_path, "--resume")
    wait_for(lambda: trial_workers(second.pid))  # the resumed search's Ray runs a trial: its worker killed
    time.sleep(1.0)
    for pid in trial_workers(second.pid):
        os.kill(pid, signal.SIGKILL)
    assert second.wait(timeout=600) == 0, (tmp_path / "search1.log").read_text()[-3000:]
    log = (tmp_path / "search1.log").read_text()
    assert "resuming search" in log and "retrying it from its last checkpoint" in log

    client, parents, trials = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == SAMPLES and all(t.info.status == "FINISHED" for t in trials)
    assert len({t.data.tags["ray_trial_id"] for t in trials}) == SAMPLES
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert parents[0].data.metrics["searcher_trials"] == SAMPLES  # Optuna's study: one trial per Ray trial
    for trial in trials:  # every epoch once or more, none missing: resumed (and retried) from its checkpoint
        steps = {m.step for m in client.get_metric_history(trial.info.run_id, "val_loss")}
        assert steps == set(range(1, EPOCHS + 1))
    champion = client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    assert champion.tags["search_run_id"] == parents[0].info.run_id
    live = optuna.load_study(study_name=parents[0].info.run_name, storage=open_journal(tmp_path / "w" /
                                                                                      "optuna-journal.log"))
    assert len(live.trials) >= SAMPLES and not [t for t in live.trials if t.state.name == "RUNNING"]
    assert {t.user_attrs["ray_trial_id"] for t in live.trials} >= {t.data.tags["ray_trial_id"] for t in trials}

    again = start(tmp_path, "--resume")  # nothing left to resume: exit 2, one line
    assert again.wait(timeout=300) == 2
    assert "nothing to resume" in (tmp_path / "search2.log").read_text()
