"""The commands that open an existing MLflow store (card, report, promote, evaluate, export, predict,
explain, serve) refuse what is no store, or no longer the store it was, with one line and exit 2,
and leave it as it was: MLflow would add its tables to any sqlite file, retry an absent server for
minutes, and fail over several lines on a damaged file or a moved working folder."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import FORMAT1_MODEL, register_model_folder, store_client, write_kaggle
from test_cluster_search import free_port

MODEL = Path(__file__).resolve().parent / "fixtures" / "model-format1"  # a real model folder, classes a and b
# Each command that opens an existing store, with what else it needs ({image}: an image file).
STORE_COMMANDS = [["card", "nuclei"], ["report"], ["promote", "nuclei", "1"], ["evaluate", "nuclei"],
                  ["export", "nuclei"], ["predict", "nuclei", "{image}"], ["explain", "nuclei", "{image}"],
                  ["serve", "nuclei", "--port", "{port}"]]


def one_line_refusals(run_cli, commands, *extra, image=None, code=2) -> set[str]:
    """The stderr of each command, which must exit `code` with one line; a set: one element when
    they all say the same."""
    lines = set()
    for args in commands:
        result = run_cli(*[a.format(image=image, port=free_port()) for a in args], *extra)
        assert result.code == code and len(result.err.strip().splitlines()) == 1, (args, result.err)
        lines.add(result.err.strip())
    return lines


def an_image(folder: Path) -> Path:
    Image.new("RGB", (8, 8)).save(folder / "cell.png")
    return folder / "cell.png"


def user_database(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("create table patients(id int)")
    connection.close()
    return path


@pytest.mark.parametrize("kind, said", [
    ("another database", "an SQLite database without MLflow's experiments and alembic_version tables"),
    ("an empty file", "an empty file"),
    ("garbage", "not an SQLite file: damaged, or another kind of file"),
    ("a folder", "a folder"),
])
def test_a_file_that_is_no_mlflow_store_is_refused_by_every_command_and_left_as_it_was(run_cli, tmp_path, kind, said):
    workdir = tmp_path / "work"
    workdir.mkdir()
    db = workdir / "mlflow.db"
    if kind == "another database":
        user_database(db)
    elif kind == "a folder":
        db.mkdir()
    else:
        db.write_bytes(b"" if kind == "an empty file" else b"garbage\n")
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    image = an_image(tmp_path)

    started = time.monotonic()
    said_by_all = one_line_refusals(run_cli, STORE_COMMANDS, "--workdir", workdir, image=image)
    assert said_by_all == {f"tune-cells: error: {db} is not an MLflow store ({said}): give the store a search "
                           "wrote (--workdir or --tracking-uri)"}
    assert time.monotonic() - started < 60  # (a folder was ~100 s of MLflow's retries per command)
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


def test_a_database_given_by_tracking_uri_gets_no_mlflow_tables(run_cli, tmp_path):
    other = user_database(tmp_path / "other.db")
    content = other.read_bytes()
    (said,) = one_line_refusals(run_cli, [["card", "nuclei"], ["report"]], "--tracking-uri", f"sqlite:///{other}",
                                "--workdir", tmp_path / "work")
    assert f"{other} is not an MLflow store (an SQLite database without MLflow's" in said
    assert other.read_bytes() == content and not (tmp_path / "work").exists()


def test_an_unreachable_server_is_one_line_at_once(run_cli, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # a closed port: MLflow alone retried for 400 s, or said "no champion"
    started = time.monotonic()
    said = one_line_refusals(run_cli, STORE_COMMANDS, "--tracking-uri", uri, "--workdir", tmp_path / "work",
                             image=an_image(tmp_path))
    assert said == {f"tune-cells: error: tracking server {uri} does not answer ([Errno 111] Connection refused)"}
    assert time.monotonic() - started < 30


def test_a_database_without_its_driver_is_named(run_cli, tmp_path):
    pytest.importorskip("sqlalchemy")
    try:
        import psycopg  # noqa: F401
        pytest.skip("psycopg is installed here")
    except ImportError:
        pass
    (said,) = one_line_refusals(run_cli, [["card", "nuclei"], ["report"], ["evaluate", "nuclei"]],
                                "--tracking-uri", "postgresql://me:s3cret@127.0.0.1:1/mlflow",
                                "--workdir", tmp_path / "work")
    assert said == ("tune-cells: error: --tracking-uri postgresql://me:***@127.0.0.1:1/mlflow: its database driver is "
                    "not installed (no module 'psycopg'; pip install 'psycopg[binary]')")


class RegistryRefusingServer(BaseHTTPRequestHandler):
    """An MLflow server (it answers /health and the experiments search) whose registry refuses this
    user: the registry failing is no answer that the task has no champion."""

    def do_GET(self):
        if "registered-models" in self.path or "model-versions" in self.path:
            self.answer(403, {"error_code": "PERMISSION_DENIED", "message": "no READ on tune-cells-nuclei"})
        else:
            self.answer(200, {"experiments": []} if "experiments" in self.path else "OK")

    def answer(self, status: int, body) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_registry_that_fails_is_not_said_to_have_no_champion(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (a 403 is not retried anyway)
    server = ThreadingHTTPServer(("127.0.0.1", 0), RegistryRefusingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        said = one_line_refusals(run_cli, [["card", "nuclei"], ["card", "nuclei", "--version", "1"]],
                                 "--tracking-uri", f"http://127.0.0.1:{server.server_port}",
                                 "--workdir", tmp_path / "work", code=1)
    finally:
        server.shutdown()
        server.server_close()
    assert all("PERMISSION_DENIED" in line or "no READ on tune-cells-nuclei" in line for line in said), said
    assert not any("no champion" in line or "no version" in line for line in said), said


def registered_store(workdir: Path, tags: dict | None = None) -> tuple[str, str]:
    """A store in `workdir` whose champion of nuclei is the fixture model, logged with a search run
    (which logs nothing else): (search run id, model version)."""
    workdir.mkdir(parents=True)
    client = store_client(workdir / "mlflow.db")
    experiment = client.create_experiment("tune-cells-nuclei",
                                          artifact_location=(workdir / "artifacts" / "tune-cells-nuclei").as_uri())
    run = client.create_run(experiment, run_name="search", tags={"tune_cells.run_type": "search"})
    client.log_artifacts(run.info.run_id, str(MODEL), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tune-cells-nuclei")
    version = client.create_model_version("tune-cells-nuclei", source=f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id,
                                          tags={"task": "nuclei", "search_run_id": run.info.run_id, **(tags or {})})
    client.set_registered_model_alias("tune-cells-nuclei", "champion", version.version)
    return run.info.run_id, version.version


def test_evaluate_into_an_experiment_deleted_in_the_ui_names_no_flag_it_lacks(run_cli, tmp_path, capsys):
    """evaluate logs into its model's search's experiment, else tune-cells-TASK; it has no --experiment,
    which its message named. Refused before anything is scored (--seeds: before any retraining)."""
    from tune_cells.analysis.evaluation import evaluation_experiment
    from tune_cells.errors import UserInputError
    from tune_cells.tasks import get_task
    from tune_cells.tracking import Tracker

    workdir = tmp_path / "work"
    workdir.mkdir()
    register_model_folder(workdir, FORMAT1_MODEL, name="tune-cells-folder", alias="champion", task="folder")
    client = store_client(workdir / "mlflow.db")
    experiment_id = client.create_experiment("tune-cells-folder")
    client.delete_experiment(experiment_id)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    capsys.readouterr()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = run_cli("evaluate", "folder", "--data", tmp_path / "data", "--workdir", workdir, "--bootstrap", 5)
    assert result.code == 2 and result.err.strip() == (
        f"tune-cells: error: experiment tune-cells-folder is deleted in {uri} (the MLflow UI's delete keeps it, "
        f"hidden): restore it (MLFLOW_TRACKING_URI='{uri}' mlflow experiments restore -x {experiment_id}), then "
        "evaluate again: it logs its run there"), result.err
    # a model of a search: the search's experiment, by its run
    run_id, _ = registered_store(tmp_path / "searched")
    searched = store_client(tmp_path / "searched" / "mlflow.db")
    searched.delete_experiment(searched.get_run(run_id).info.experiment_id)
    tracker = Tracker(f"sqlite:///{tmp_path / 'searched' / 'mlflow.db'}", tmp_path / "searched" / "artifacts")
    with pytest.raises(UserInputError, match="experiment tune-cells-nuclei is deleted in") as refused:
        evaluation_experiment(tracker, get_task("nuclei"), run_id)
    assert "--experiment" not in str(refused.value) and "mlflow experiments restore -x" in str(refused.value)


def test_a_moved_working_folder_names_where_its_artifacts_were(run_cli, tmp_path, capsys):
    old, new = tmp_path / "store", tmp_path / "store3"
    registered_store(old)
    capsys.readouterr()  # (MLflow's lines as it created the store)
    image = an_image(tmp_path)
    made_there = run_cli("predict", "nuclei", image, "--workdir", old, "--output", tmp_path / "predicted.csv")
    assert made_there.code == 0, made_there.err  # where it was made, the store opens
    shutil.move(old, new)
    said = one_line_refusals(run_cli, [["predict", "nuclei", "{image}"], ["export", "nuclei"],
                                       ["evaluate", "nuclei"]], "--workdir", new, image=image)
    (line,) = said
    assert line.startswith("tune-cells: error: models:/tune-cells-nuclei@champion: the store's artifacts are at "
                           f"{old}/artifacts/"), line
    assert line.endswith(f"and {old} no longer exists (the working folder moved? the store keeps absolute paths: "
                         "move it back)"), line
    assert not old.exists()  # nothing written at the old place either


def test_a_split_file_that_is_gone_everywhere_is_named_and_nothing_is_created(run_cli, tmp_path, capsys):
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 3)
    workdir = tmp_path / "work"
    split_file = workdir / "splits" / "nuclei-0123abcd-0.json"  # neither on disk nor logged with the search
    run_id, _ = registered_store(workdir, {"data_root": str(data), "split_file": str(split_file)})
    capsys.readouterr()
    before = sorted(str(p) for p in workdir.rglob("*"))
    (said,) = one_line_refusals(run_cli, [["evaluate", "nuclei"]], "--workdir", workdir)
    assert said == (f"tune-cells: error: split file {split_file} of this model is missing, and its search run {run_id} "
                    "holds no copy (split/nuclei-0123abcd-0.json): put the file back to score the model on the part it "
                    "was tested on")
    assert not (workdir / "splits").exists()
    assert sorted(str(p) for p in workdir.rglob("*")) == before


def test_training_data_that_is_gone_is_named_without_a_flag_the_command_lacks(run_cli, tmp_path, capsys):
    gone = tmp_path / "data-moved-away"
    registered_store(tmp_path / "work", {"data_root": str(gone), "split_file": str(tmp_path / "split.json")})
    capsys.readouterr()
    said = one_line_refusals(run_cli, [["evaluate", "nuclei"], ["export", "nuclei"]], "--workdir", tmp_path / "work")
    assert said == {f"tune-cells: error: {gone}: the data this model was trained on is not there (moved or deleted?); "
                    "`tune-cells evaluate` scores other labelled data with --data DIR"}, said


def test_a_copied_working_folder_is_told_where_its_artifacts_go(run_cli, tmp_path, caplog):
    """MLflow keeps absolute artifact paths: a copy still logs into the folder it was copied from."""
    original, copy = tmp_path / "store", tmp_path / "copy"
    registered_store(original)
    shutil.copytree(original, copy)
    image = an_image(tmp_path)
    with caplog.at_level("WARNING", logger="tune_cells.commands.opening"):
        result = run_cli("predict", "nuclei", image, "--workdir", copy, "--output", tmp_path / "from-copy.csv")
    assert result.code == 0, result.err
    assert (f"{copy / 'mlflow.db'} keeps its artifacts in {original / 'artifacts' / 'tune-cells-nuclei'}, outside "
            f"{copy} (a working folder copied from there?)") in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tune_cells.commands.opening"):
        assert run_cli("predict", "nuclei", image, "--workdir", original, "--output", tmp_path / "there.csv").code == 0
    assert "keeps its artifacts" not in caplog.text


def as_a_reader(args: list, cwd: Path):
    """`tune-cells ARGS` in a process that cannot write where the permission bits say no: root
    writes anywhere, so it runs without CAP_DAC_OVERRIDE (setpriv), as a user who only reads would."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("runs as root, and setpriv (to drop root's right to write anywhere) is not installed")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run([*prefix, sys.executable, "-m", "tune_cells", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # (two CLI processes, ~8 s each)
def test_predict_reads_a_store_shared_read_only_and_writes_only_its_output(tmp_path, capsys):
    workdir = tmp_path / "shared"
    registered_store(workdir)
    capsys.readouterr()
    image = an_image(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    folders = [workdir, *(p for p in workdir.rglob("*") if p.is_dir())]
    before = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    for path in [*workdir.rglob("*"), workdir]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        read = as_a_reader(["predict", "nuclei", image, "--workdir", workdir, "--output", mine / "p.csv"], mine)
        assert read.returncode == 0, read.stderr
        assert (mine / "p.csv").read_text().splitlines()[0] == "path,predicted_class,prob_a,prob_b"
        # Without --output the CSV would go in the store's folder: one line says so, and how to avoid it.
        default = as_a_reader(["predict", "nuclei", image, "--workdir", workdir], mine)
        assert default.returncode == 2 and default.stderr == (
            f"tune-cells: error: --workdir {workdir} (predictions go in it unless --output names another place): "
            "cannot write there (Permission denied)\n"), default.stderr
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before
    assert sorted(p.name for p in mine.iterdir()) == ["p.csv"]


def test_a_search_into_an_experiment_deleted_in_the_ui_is_one_line_before_anything_is_written(run_cli, tmp_path,
                                                                                             capsys):
    """The MLflow UI's delete only marks an experiment: its name stays taken and no run can start in
    it. The search failed with MLflow's message (exit 1) after Ray had started and the read log was
    written; now the preflight names it and the way back."""
    from tune_cells.errors import UserInputError
    from tune_cells.tracking import Tracker

    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8, size=8)
    workdir = tmp_path / "work"
    client = store_client(workdir / "mlflow.db")
    for name in ("tune-cells-nuclei", "mine"):
        client.delete_experiment(client.create_experiment(name))
    before = {p: p.read_bytes() for p in workdir.rglob("*")}
    capsys.readouterr()  # (MLflow's lines on making the store)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    for flags, name in [([], "tune-cells-nuclei"), (["--experiment", "mine", "--warm-start"], "mine")]:
        result = run_cli("search", "nuclei", "--data", data, "--workdir", workdir, *flags)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        experiment_id = client.get_experiment_by_name(name).experiment_id
        assert result.err.strip() == (f"tune-cells: error: experiment {name} is deleted in {uri} (the MLflow UI's "
                                      f"delete keeps it, hidden): restore it (MLFLOW_TRACKING_URI='{uri}' mlflow "
                                      f"experiments restore -x {experiment_id}) or give another --experiment")
    assert {p: p.read_bytes() for p in workdir.rglob("*")} == before  # no split, read log, run or Ray folder
    with pytest.raises(UserInputError, match="experiment mine is deleted in"):  # deleted after the preflight
        Tracker(uri, workdir / "mlartifacts").experiment_id("mine")
