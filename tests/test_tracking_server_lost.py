"""A tracking server that stops answering mid-search (a real `mlflow server` on 127.0.0.1, killed):
the search ends in one line after MLflow's own retries, not after minutes of retries per call,
and `--resume` finishes it once the server is back: one search, every trial recorded once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from test_exposure import start_mlflow_server

from conftest import short_tmpdir
from test_resume import SPACE

pytestmark = pytest.mark.slow


def test_a_search_whose_tracking_server_stops_answering_ends_in_one_line_and_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "space.yaml").write_text(SPACE)
    server, port = start_mlflow_server(tmp_path)
    uri = f"http://127.0.0.1:{port}"
    # MLflow's retries shortened (a user's default: 7 retries, about 4 minutes per request)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"),
           "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    command = [sys.executable, "-m", "tune_cells", "search", "nuclei", "--samples", "3", "--max-epochs", "8",
               "--grace-period", "8", "--max-concurrent", "1", "--space", "space.yaml", "--workdir", "w", "--no-evaluate"]
    log = tmp_path / "first.log"
    try:
        with log.open("w") as out:
            search = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            deadline = time.monotonic() + 300
            while "done (1 finished)" not in log.read_text():
                assert search.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
            os.killpg(server.pid, 9)
            server.wait(timeout=60)
            stopped = time.monotonic()
            assert search.wait(timeout=300) == 1, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 120  # one request's retries, then every call refused at once
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith(f"tune-cells: failed: TrackingLost: the tracking server at {uri} stopped answering "
                               "(connection refused); nothing more was recorded"), last
        assert "a search: the same command with --resume" in last

        server, _ = start_mlflow_server(tmp_path, port)  # the same store, back on the same port
        resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Promoted: models:/tune-cells-nuclei-demo@champion" in resumed.stdout
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("tune-cells-nuclei-demo").experiment_id])
        parents = [r for r in runs if r.data.tags.get("tune_cells.run_type") == "search"]
        trials = [r for r in runs if r.data.tags.get("tune_cells.run_type") == "trial"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
