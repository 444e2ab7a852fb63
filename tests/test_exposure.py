"""What a search exposes beyond its own process: the sockets a local Ray listens on, and where a
tracking password could surface (command lines that `ps` shows, console output, MLflow params)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import short_tmpdir

pytestmark = pytest.mark.slow

SECRET = "s3cret-t0ken"


# --- reading /proc (Linux) ------------------------------------------------------------------


def descendants(root: int) -> set[int]:
    """`root` and every process below it (Ray's GCS, raylet, agents and workers descend from the driver)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp* prints each 32-bit word of the address in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"


def listening_sockets(pids: set[int]) -> list[tuple[int, str, str]]:
    """(pid, process name, local address) of every listening TCP socket the processes hold."""
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                by_inode[fields[9]] = _address(fields[1])
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in by_inode:
                found.append((pid, name, by_inode[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rpartition(":")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1]: an IPv6 socket bound to 127.0.0.1
    return (mapped or ip).is_loopback


def command_lines_with(text: str) -> list[str]:
    hits = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            hits.append(f"{path.parent.name}: {line.replace(text, '<password>')[:300]}")
    return hits


# --- Ray ------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_a_local_search_ray_listens_on_loopback_only_with_token_auth(monkeypatch):
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from tune_cells import ray_backend

    monkeypatch.setenv("TUNE_CELLS_RAY_TMPDIR", short_tmpdir("tcr"))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's own default for a new local cluster
    ray_backend.shutdown()
    cluster_setting = ray_constants.ENABLE_RAY_CLUSTER
    ray_backend.init(num_cpus=1, object_store_bytes=100 << 20)  # as a local search starts it
    try:
        assert ray_constants.ENABLE_RAY_CLUSTER == cluster_setting  # changed only while the node started
        worker = ray.get(ray.remote(lambda: os.getpid()).remote())  # a lambda travels by value
        time.sleep(1)
        listeners = listening_sockets(descendants(os.getpid()))
        names = {name for _, name, _ in listeners}
        assert {"gcs_server", "raylet"} <= names and worker in {pid for pid, _, _ in listeners}, listeners
        exposed = [(name, address) for _, name, address in listeners if not is_loopback(address)]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        ray_backend.shutdown()


# --- a tracking password ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """MLflow's tracking server on 127.0.0.1 (it ignores basic-auth credentials), its store in
    `folder` (a second start on the same `port` serves the same store again)."""
    port = port or free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder}/server.db"],
        cwd=folder, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server, port
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_a_tracking_password_is_in_no_command_line_output_or_parameter(tmp_path):
    """The password reaches the search through MLFLOW_TRACKING_URI (a flag would put it in the
    driver's own command line). Needs the evaluation subprocess to take the URI from its
    environment too (analysis/promotion.py `evaluate_in_fresh_process`). The search is
    `--smoke-test`, the run CI makes of the installation (Ray Tune's examples' flag): 2 trials of
    2 epochs, promoted and evaluated; one search serves both checks, as each costs a minute here."""
    from mlflow.tracking import MlflowClient

    server, port = start_mlflow_server(tmp_path)
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"),
           "PYTHONUNBUFFERED": "1"}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "tune_cells", "search", "nuclei", "--smoke-test", "--workdir", tmp_path / "w"]
    leaks: set[str] = set()
    try:
        with out.open("w") as stdout, err.open("w") as stderr:
            search = subprocess.Popen(list(map(str, command)), cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
                                      start_new_session=True)
            deadline = time.monotonic() + 1100
            while search.poll() is None and time.monotonic() < deadline:
                leaks.update(command_lines_with(SECRET))  # the driver, Ray's processes, the evaluation
                time.sleep(0.2)
            if search.poll() is None:
                os.killpg(search.pid, 9)
        output = out.read_text() + err.read_text()
        assert search.returncode == 0, output[-3000:]
        assert "2 trials" in output and "Promoted: models:/tune-cells-nuclei-demo@champion" in output, output[-3000:]
        assert "test_balanced_accuracy" in output  # evaluated in a fresh process, through the same environment
        assert not leaks, "the password is in command lines:\n" + "\n".join(sorted(leaks))
        assert SECRET not in output
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
        runs = client.search_runs([experiment.experiment_id])
        search_run = next(r for r in runs if r.data.tags.get("tune_cells.run_type") == "search")
        assert (search_run.data.params["samples"], search_run.data.params["max_epochs"],
                search_run.data.params["grace_period"]) == ("2", "2", "1")  # the smoke test's budget, logged
        for run in runs:
            assert SECRET not in repr((run.data.params, run.data.tags)), run.info.run_name
        kept = [p for p in (tmp_path / "w").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
        assert not kept, f"the password is written in {kept}"  # Ray's experiment state, splits, read log
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_ui_gives_mlflow_its_store_by_environment_not_on_a_command_line(tmp_path):
    """`mlflow ui --backend-store-uri URI` showed the store to every user (ps), a database URI's
    password included; the UI must still open that store."""
    from conftest import stop_process_group, store_client

    workdir = tmp_path / "w"
    workdir.mkdir()
    store_client(workdir / "mlflow.db").create_experiment("tune-cells-nuclei-demo")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen([sys.executable, "-m", "tune_cells", "ui", "--workdir", str(workdir), "--port", str(port)],
                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "the MLflow UI did not start"
                time.sleep(0.5)
        # (`tune-cells ui --workdir W` itself became `mlflow ui` before /health answered)
        assert not command_lines_with(str(workdir)), command_lines_with(str(workdir))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10",
                                    timeout=10) as response:
            assert b"tune-cells-nuclei-demo" in response.read()  # the store it was given, not a new one
    finally:
        stop_process_group(ui)
