"""A search on a real two-node Ray cluster on loopback (`ray start --head` + `ray start --address`).

The second node declares a GPU resource: on a CPU-only machine that is enough to test placement
(a trial given a GPU falls back to the CPU when CUDA is absent).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_subprocess, short_tmpdir, store_client

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-cpus=1"]
    temp_dir = short_tmpdir("tcc")
    head = [RAY, "start", "--head", f"--port={port}", "--num-gpus=0", "--include-dashboard=false",
            f"--temp-dir={temp_dir}", *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-gpus=1", *common]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        nodes = _nodes(f"127.0.0.1:{port}", env)
        yield {"address": f"127.0.0.1:{port}", "env": env, "nodes": nodes}
    finally:  # this cluster's processes only: `ray stop` would also stop a search the developer is running
        stop_ray_processes_under(temp_dir)


def stop_ray_processes_under(temp_dir: str) -> None:
    """SIGKILL every process whose command line names `temp_dir` (Ray passes its session folder to
    each of its processes), and their children (agents rename themselves `ray::...`)."""
    import signal
    import time

    for _ in range(2):
        rows = subprocess.run(["ps", "-eww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        table = [line.split(None, 2) for line in rows.splitlines() if len(line.split(None, 2)) == 3]
        ours = {int(pid) for pid, _, args in table if temp_dir in args and int(pid) != os.getpid()}
        ours |= {int(pid) for pid, parent, _ in table if int(parent) in ours}
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _nodes(address: str, env: dict) -> dict[str, str]:
    """node id -> 'gpu' or 'cpu', asked of the cluster by a separate driver."""
    code = (
        "import ray, json\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "print(json.dumps({n['NodeID']: 'gpu' if n['Resources'].get('GPU') else 'cpu' for n in ray.nodes() if n['Alive']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=120)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


SPACE = """
params:
  model: small_convnet
  depth: 2
  width: 8
  optimizer: adamw
  lr: {float: [1.0e-3, 3.0e-3], log: true}
  batch_size: 64
  image_size: 32
"""


def run_on(cluster, tmp_path, *flags, epochs: int = 1) -> list:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    workdir = tmp_path / "work"
    result = cli_subprocess(["search", "nuclei", "--address", cluster["address"], "--samples", 4, "--max-epochs", epochs,
                             "--space", space, "--workdir", workdir, "--no-evaluate", *flags],
                            cwd=tmp_path, env_extra=cluster["env"])
    assert result.code == 0, result.err[-3000:]
    client = store_client(workdir / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    return client.search_runs([experiment.experiment_id], "tags.`tune_cells.run_type` = 'trial'")


def test_trials_spread_over_both_nodes(cluster, tmp_path):
    # Trials long enough (~6 s) that a second one starts while the first runs (1 CPU per node:
    # two concurrent trials need both nodes); one-second trials are all run by one reused worker.
    trials = run_on(cluster, tmp_path, "--cpus-per-trial", 1, "--gpus-per-trial", 0, epochs=25)
    assert len(trials) == 4
    used = {t.data.tags["ray_node_id"] for t in trials}
    assert used == set(cluster["nodes"]), (used, cluster["nodes"])


def test_gpu_trials_land_only_on_the_gpu_node(cluster, tmp_path):
    trials = run_on(cluster, tmp_path, "--gpus-per-trial", 0.5)
    assert len(trials) == 4
    assert {cluster["nodes"][t.data.tags["ray_node_id"]] for t in trials} == {"gpu"}
    assert all(t.info.status == "FINISHED" for t in trials)  # CPU fallback: no CUDA here


def test_trials_that_fit_no_node_are_explained_in_plain_words(cluster, tmp_path):
    """On a cluster the autoscaler may add nodes, so the search waits, and says why."""
    import select
    import signal
    import time

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    env = {**os.environ, **cluster["env"], "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    search = subprocess.Popen(
        [sys.executable, "-m", "tune_cells", "search", "nuclei", "--address", cluster["address"], "--samples", "2",
         "--max-epochs", "1", "--space", str(space), "--workdir", str(tmp_path / "work"), "--gpus-per-trial", "2"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    seen, deadline = "", time.time() + 120
    try:
        while time.time() < deadline and "pending" not in seen:
            ready, _, _ = select.select([search.stderr], [], [], 5)
            if ready:
                line = search.stderr.readline()
                if not line:
                    break
                seen += line
    finally:
        os.killpg(search.pid, signal.SIGKILL)
        search.wait(timeout=30)
    # One pending trial per free slot: two here, each explained once.
    assert re.search(r"\d+ trials? pending: each needs 1 CPU, 2 GPU on one node, the largest node has 1 CPU, 1 GPU",
                     seen), seen[-2000:]
