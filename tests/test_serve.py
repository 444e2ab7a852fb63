"""`tune-cells predict` and `tune-cells serve`: MLflow's real model server on loopback."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pandas as pd
import pytest
from test_warm_start import copy_workdir

from conftest import cli_subprocess, stop_process_group, wait_for_ping
from test_cluster_search import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(searched, tmp_path_factory):
    """The session's searched store behind a real server: a copy, as `searched` asks of any test that may
    write into it (predict's default output goes to the workdir)."""
    root = tmp_path_factory.mktemp("serve")
    workdir = copy_workdir(searched["workdir"], root / "work")
    port = free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    # `path` rows are read only under --allow-path-root: the demo images are in the workdir.
    server = subprocess.Popen([sys.executable, "-m", "tune_cells", "serve", "nuclei", "--workdir", workdir,
                               "--port", str(port), "--allow-path-root", workdir], cwd=root, env=env,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(url, server, 120)
        yield {"root": root, "workdir": workdir, "url": url, "server": server}
    finally:
        stop_process_group(server)


def post(url: str, body: bytes | str, content_type: str = "application/json"):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def some_images(workdir, n=4):
    return sorted((workdir / "demo-data" / "nuclei" / "train").glob("*.png"))[:n]


def test_server_answers_like_predict(served):
    images = some_images(served["workdir"])
    output = served["root"] / "predicted.csv"
    predicted = cli_subprocess(["predict", "nuclei", *images, "--workdir", served["workdir"], "--output", output],
                               cwd=served["root"])
    assert predicted.code == 0, predicted.err[-2000:]
    expected = pd.read_csv(output)
    assert list(expected["path"]) == [str(p) for p in images]

    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    status, answer = post(served["url"], json.dumps({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}))
    assert status == 200, answer
    by_bytes = pd.DataFrame(answer["predictions"])
    status, answer = post(served["url"], json.dumps({"dataframe_records": [{"path": str(p)} for p in images]}))
    assert status == 200, answer
    by_path = pd.DataFrame(answer["predictions"])
    for served_answer in (by_bytes, by_path):
        assert list(served_answer["predicted_class"]) == list(expected["predicted_class"])
        for column in [c for c in expected.columns if c.startswith("prob_")]:
            assert served_answer[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "body, content_type, expect",
    [
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"hello").decode()]]}}),
         "application/json", "not a decodable image"),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}}),
         "application/json", "not a decodable image"),
        (json.dumps({"dataframe_records": [{"colour": "red"}]}), "application/json", "column"),
        ("", "application/json", ""),
        ("{not json", "application/json", ""),
        ("image bytes", "image/png", ""),
    ],
    ids=["not-an-image", "not-base64", "wrong-column", "empty-body", "bad-json", "wrong-content-type"],
)
def test_bad_requests_get_4xx_and_the_server_lives_on(served, body, content_type, expect):
    status, answer = post(served["url"], body, content_type)
    assert 400 <= status < 500, (status, answer)
    assert expect in str(answer)
    with urllib.request.urlopen(f"{served['url']}/ping", timeout=5) as response:
        assert response.status == 200
    assert served["server"].poll() is None


def test_predict_rejects_missing_files_and_overwrites_nothing(served, tmp_path):
    existing = tmp_path / "keep.csv"
    existing.write_text("mine")
    image = some_images(served["workdir"], 1)[0]
    result = cli_subprocess(["predict", "nuclei", image, "--workdir", served["workdir"], "--output", existing],
                            cwd=served["root"])
    assert result.code == 2 and "already exists" in result.err and existing.read_text() == "mine"
    # a place that cannot be written is refused before any image is predicted, not after
    result = cli_subprocess(["predict", "nuclei", image, "--workdir", served["workdir"], "--output",
                             existing / "out.csv"], cwd=served["root"])
    assert result.code == 2 and f"{existing} is not a folder" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    result = cli_subprocess(["predict", "nuclei", tmp_path / "absent.png", "--workdir", served["workdir"]],
                            cwd=served["root"])
    assert result.code == 2 and "absent.png: no such file or folder" in result.err
