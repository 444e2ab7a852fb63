"""Shared fixtures: small real datasets on disk, and the real CLI run in-process or as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests and CI stay offline: a default space searches only pretrained networks whose weights are
# already cached (none on a clean CI machine, so its from-scratch fallback), never downloads.
os.environ.setdefault("TUNE_CELLS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `tune-cells ARGS` through the real entry point (`main`) in this process."""
    from tune_cells.cli import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["tune-cells", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def write_kaggle(root: Path, labels: list[int], size: int = 24, seed: int = 0) -> Path:
    """A Kaggle-layout dataset (train.csv + train/<n>.png) of random RGB images."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = ["Filename,Label"]
    for number, label in enumerate(labels, start=1):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"{number}.png")
        rows.append(f"{number}.png,{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def png_of_zeros(width: int, height: int, bit_depth: int) -> bytes:
    """A valid greyscale PNG of zeros, written row by row (never `width*height` bytes in memory):
    a few hundred KB that decode to hundreds of MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte + the row's samples
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def kaggle_dataset(tmp_path) -> Path:
    return write_kaggle(tmp_path / "nuclei", [0] * 10 + [1] * 12 + [2] * 10 + [3] * 11)


def short_tmpdir(prefix: str) -> str:
    """Ray's Unix sockets need a path under 107 bytes: pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def cli_subprocess(args: list[str], cwd: Path, timeout: int = 900, env_extra: dict | None = None,
                   new_session: bool = False) -> CliResult:
    """`tune-cells ARGS` in a fresh interpreter; `new_session`: as the leader of its own process
    group, so a failpoint's SIGKILL takes the Ray it started with it (as a power cut would)."""
    env = {**os.environ, "TUNE_CELLS_RAY_TMPDIR": short_tmpdir("tcr"), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "tune_cells", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=new_session)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def wait_for_ping(url: str, server: subprocess.Popen, seconds: float, log=lambda: "") -> None:
    """Until the server at `url` answers /ping; fails with `log()`'s tail if it exits or stays silent."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited: {log()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"server did not answer /ping within {seconds:g} s: {log()[-2000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to a process started in its own session, and its children."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def store_client(db: Path):
    """An MlflowClient on a sqlite store, registry included: never MLflow's process-global registry
    URI, which a test that loads a pyfunc model may have pointed at another store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    """Put back MLflow's global tracking/registry URIs (and their env vars) after each test."""
    import mlflow

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    mlflow.set_registry_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


SEARCHED_SPACE = """
params:
  model: small_convnet
  depth: 2
  width: {choices: [12, 16]}
  dropout: {float: [0.0, 0.3]}
  optimizer: adamw
  lr: {float: [1.0e-3, 5.0e-3], log: true}
  batch_size: 32
  lr_schedule: constant
  image_size: 40
initial_points:
  - {width: 16, dropout: 0.1, lr: 0.004}
  - {width: 12, dropout: 0.2, lr: 1.0e-7}
"""


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """One small real search (Ray + Optuna + ASHA + MLflow) that every slow analysis test reads.
    Read-only: a test that changes the store copies `workdir` first."""
    root = tmp_path_factory.mktemp("analysis")
    (root / "space.yaml").write_text(SEARCHED_SPACE)
    workdir = root / "work"
    result = cli_subprocess(["search", "nuclei", "--samples", 4, "--max-epochs", 3, "--grace-period", 1,
                             "--reduction-factor", 2, "--max-concurrent", 1, "--space", root / "space.yaml",
                             "--workdir", workdir, "--seed", 3], cwd=root)
    assert result.code == 0, result.err[-3000:]
    client = store_client(workdir / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    return {"root": root, "workdir": workdir, "client": client, "experiment": experiment, "result": result}


def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (works as root, as in CI)."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A trainer run in the test process sets torch's thread count (a trial's CPUs); later tests,
    e.g. latency measured on "cpu (2 threads)", must see the machine's own again."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


FORMAT1_MODEL = Path(__file__).resolve().parent / "fixtures" / "model-format1"  # a logged model folder, 2 classes


def register_model_folder(workdir: Path, folder: Path, name: str = "tune-cells-nuclei", alias: str | None = None,
                          task: str = "nuclei") -> str:
    """Register a logged model folder as is (uploaded, not re-logged: no training, no search) as the
    next version of `name`, a model of `task`, in `workdir`'s store; returns its models:/NAME/N."""
    from mlflow.exceptions import MlflowException

    client = store_client(workdir / "mlflow.db")
    experiment = client.get_experiment_by_name("registered-by-test")
    experiment_id = (experiment.experiment_id if experiment else client.create_experiment(
        "registered-by-test", artifact_location=(workdir / "mlartifacts").as_uri()))
    run = client.create_run(experiment_id, run_name=folder.name)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except MlflowException:  # registered by an earlier call
        pass
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags={"task": task}).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}"


def model_copy(root: Path, label: str, **spec_changes) -> Path:
    """A copy of the format-1 fixture model folder with its model.json's fields changed (None: removed)."""
    import json

    folder = root / label
    shutil.copytree(FORMAT1_MODEL, folder)
    spec_file = folder / "artifacts" / "checkpoint" / "model.json"
    document = json.loads(spec_file.read_text())
    for key, value in spec_changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    spec_file.write_text(json.dumps(document))
    return folder
