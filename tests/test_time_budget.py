"""`--time-budget`: after that many minutes of trials every running trial stops at its last reported
epoch and none starts; the champion is promoted from what was reported, and the trials the budget
ended are told apart from those ASHA stopped (their runs, the search run, the command's summary)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_search_end_to_end import SPACE

from conftest import cli_subprocess, short_tmpdir, store_client
from test_resume import trial_statuses, wait_for

pytestmark = pytest.mark.slow

# The end-to-end test's space (its first trial learns); only the budget can end a trial of 500 epochs.
MAX_EPOCHS = 500
# Half a minute of trials: the first trial reports two epochs within about 10 s of it, so the budget
# runs out in the resumed process.
BUDGET_MIN = 0.5


def arguments(budget_min: float | None) -> list[str]:
    """Trials one at a time with every CPU (as the defaults on 2 cores run), so one trial is still
    pending when the budget runs out: it never started, and is not counted as a trial."""
    budget = ["--time-budget", str(budget_min)] if budget_min is not None else []
    return ["search", "nuclei", "--samples", "3", "--max-epochs", str(MAX_EPOCHS), "--grace-period", str(MAX_EPOCHS),
            "--cpus-per-trial", str(os.cpu_count()), "--space", "space.yaml", "--workdir", "w", "--no-evaluate", *budget]


def search(root, budget_min: float, *extra: str):
    (root / "space.yaml").write_text(SPACE)
    return cli_subprocess([*arguments(budget_min), *extra], cwd=root)


def epochs_reported(db: Path) -> int:
    try:
        with sqlite3.connect(db) as connection:
            return connection.execute("select count(*) from metrics where key = 'val_balanced_accuracy'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked by the writer
        return 0


def test_a_budgeted_search_interrupted_and_resumed_ends_on_its_budget_and_promotes_from_what_was_reported(tmp_path):
    """Ctrl-C after the first trial has reported epochs, then `--resume` with the same budget (a
    resume must repeat it): the budget runs out in the resumed process, which stops the running
    trial and starts no other. Its promotion refuses every trial (--max-latency-ms), so a second
    `--resume` under another latency budget promotes without training, reading the budget's
    bookkeeping back from the trial runs (the trial it stopped is not ASHA's, the two it never
    started are no trials): one search, one champion."""
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {**os.environ, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "tune_cells", *arguments(BUDGET_MIN)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        db = tmp_path / "w" / "mlflow.db"
        wait_for(lambda: "RUNNING" in trial_statuses(db) and epochs_reported(db) >= 2)
        os.kill(first.pid, signal.SIGINT)
        assert first.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]
    refused = cli_subprocess([*arguments(BUDGET_MIN), "--resume", "--max-latency-ms", "0.000001"], cwd=tmp_path)
    assert refused.code == 2, refused.err[-3000:]
    assert f"time budget of {BUDGET_MIN:g} min reached: running trials stopped at their last epoch (1), trials never " \
           "started (2 of 3)" in refused.err
    result = cli_subprocess([*arguments(BUDGET_MIN), "--max-latency-ms", "100000", "--resume"], cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    assert "1 trials (0 stopped early by ASHA, 1 by the time budget, 0 failed)" in result.out
    assert "Promoted: models:/tune-cells-nuclei-demo@champion" in result.out

    client = store_client(db)
    runs = client.search_runs([client.get_experiment_by_name("tune-cells-nuclei-demo").experiment_id])
    parents = [r for r in runs if r.data.tags.get("tune_cells.run_type") == "search"]
    trials = [r for r in runs if r.data.tags.get("tune_cells.run_type") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["time_budget"] == str(BUDGET_MIN)
    assert not [t for t in trials if t.info.status == "RUNNING"]
    ended = [t for t in trials if t.data.tags.get("stopped_by_time_budget") == "true"]
    assert len(ended) == len(trials) == parent.data.metrics["trials"] == 1
    assert parent.data.metrics["trials_stopped_by_time_budget"] == 1 and ended[0].info.status == "FINISHED"
    for trial in ended:  # not ASHA's: its grace period is the whole budget of epochs
        assert "stopped_early" not in trial.data.tags and 1 <= int(trial.data.tags["epochs_run"]) < MAX_EPOCHS
    assert parent.data.metrics["trials_stopped_early"] == 0
    assert client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion").run_id


def test_a_budget_no_trial_can_report_in_is_one_line_and_promotes_nothing(tmp_path):
    result = search(tmp_path, 0.001)
    assert result.code == 2, result.err[-3000:]
    assert result.err.strip().splitlines()[-1] == ("tune-cells: error: --time-budget 0.001: no trial finished an "
                                                   "epoch within it; nothing promoted (give it more minutes)")
    client = store_client(tmp_path / "w" / "mlflow.db")
    assert not client.search_registered_models()
