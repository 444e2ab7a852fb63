"""Preflight checks beside the bad-input corpus: what a tracking server is sent and must answer,
the options the preflight corrects rather than refuses, and how image paths are normalised."""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image

from tune_cells.errors import UserInputError
from tune_cells.preflight import SearchOptions, check_options
from tune_cells.tracking_checks import check_server, split_credentials


class FakeMlflow(BaseHTTPRequestHandler):
    """Answers /health and MLflow's experiments search, and records the Authorization headers."""

    seen: list[str | None] = []
    status = 200

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization"))
        if type(self).status != 200:
            self.send_error(type(self).status)
            return
        body = b"OK" if self.path == "/health" else json.dumps({"experiments": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_mlflow():
    FakeMlflow.seen, FakeMlflow.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_credentials_in_the_uri_go_as_basic_auth(fake_mlflow, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    check_server(f"http://user:s3cret@127.0.0.1:{fake_mlflow}")
    expected = "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert FakeMlflow.seen == [expected, expected]  # /health, then the MLflow call


def test_without_credentials_in_the_uri_mlflow_variables_are_used(fake_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "env-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pass")
    check_server(f"http://127.0.0.1:{fake_mlflow}/")
    assert FakeMlflow.seen[0] == "Basic " + base64.b64encode(b"env-user:env-pass").decode()


def test_a_password_with_reserved_characters_is_sent_decoded(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    base, headers = split_credentials("https://bob:p%40ss%3Aw@mlflow.example.org:8443/prefix/")
    assert base == "https://mlflow.example.org:8443/prefix"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"bob:p@ss:w").decode()


def test_refused_credentials_are_named_without_the_password(fake_mlflow):
    FakeMlflow.status = 401
    with pytest.raises(UserInputError, match=r"http://user:\*\*\*@127.0.0.1:\d+ refused the credentials") as info:
        check_server(f"http://user:s3cret@127.0.0.1:{fake_mlflow}")
    assert "s3cret" not in str(info.value)


def test_grace_period_above_max_epochs_is_clamped_once_and_said(caplog):
    opts = SearchOptions(task="nuclei", max_epochs=3, grace_period=5)
    with caplog.at_level(logging.WARNING, logger="tune_cells.search_options"):
        check_options(opts)
    assert opts.grace_period == 3  # what ASHA gets and what the search run logs (asdict(opts))
    assert [r.getMessage() for r in caplog.records] == ["--grace-period 5 is above --max-epochs 3: using 3"]


@pytest.mark.parametrize("name", ["/abs/name", "../up", "a/b", "a\\b", "..", "."])
def test_experiment_names_that_would_leave_the_workdir_are_refused(name):
    with pytest.raises(UserInputError, match="must be a plain name"):
        check_options(SearchOptions(task="nuclei", experiment=name))


def test_plain_experiment_names_pass():
    for name in ("tune-cells-nuclei", "my run 2", "v1.2..3"):
        check_options(SearchOptions(task="nuclei", experiment=name))


def test_image_paths_are_normalised_and_may_pass_through_a_folder_inside(tmp_path):
    from tune_cells.data.images import ImageIndex

    (tmp_path / "train").mkdir()
    for name in ("1.png", "2.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / name)
    items = pd.DataFrame({"path": ["train/./1.png", "train/../train/2.png"], "label": [0, 1]})
    index = ImageIndex(root=tmp_path, items=items, classes=["a", "b"])
    assert list(index.items["path"]) == ["train/1.png", "train/../train/2.png"]
    with pytest.raises(UserInputError, match="one image listed twice, as train/1.png and train/../train/1.png"):
        ImageIndex(root=tmp_path, items=pd.DataFrame({"path": ["train/1.png", "train/../train/1.png"],
                                                      "label": [0, 1]}), classes=["a", "b"])


def test_a_relative_storage_reaches_ray_as_an_absolute_path(tmp_path, monkeypatch):
    from tune_cells.preflight import ray_storage

    monkeypatch.chdir(tmp_path)  # Ray's file system layer refuses a relative path (exit 1, after the store opened)
    assert ray_storage(SearchOptions(task="nuclei", storage="rel/ray"), None) == str(tmp_path / "rel" / "ray")
    for uri in ("s3://bucket/ray", "file:///shared/ray"):
        assert ray_storage(SearchOptions(task="nuclei", storage=uri), None) == uri


def test_a_workdir_inside_data_is_refused_only_where_the_importer_would_read_it(tmp_path):
    """A folder-task dataset read as a tree would list the store as images on the next run; a
    hidden working folder, or one inside a train.csv dataset, is never read."""
    from tune_cells.paths import WorkDir
    from tune_cells.preflight import load_dataset
    from tune_cells.tasks import get_task

    from conftest import write_kaggle

    folder = tmp_path / "cells"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / label / f"{i}.png")
    for workdir in (folder, folder / "tune-cells-runs", folder / "a" / "runs"):
        with pytest.raises(UserInputError, match="is inside --data .*or a hidden one"):
            load_dataset(get_task("folder"), folder, WorkDir.at(workdir))
    assert len(load_dataset(get_task("folder"), folder, WorkDir.at(folder / ".tune-cells")).items) == 6
    kaggle = write_kaggle(tmp_path / "nuclei", [0, 1, 2, 3] * 2)
    assert len(load_dataset(get_task("nuclei"), kaggle, WorkDir.at(kaggle / "tune-cells-runs")).items) == 8
