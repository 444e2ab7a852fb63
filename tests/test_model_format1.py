"""A model registered by an old tune-cells (checkpoint format 1) still loads, predicts and serves.

tests/fixtures/model-format1/ is the MLflow model folder that the code of commit dbb3ad2 logged and
registered, and model-format1-expected.json holds that code's predictions for the four images in
model-format1-images/ (see tests/fixtures/make_model_format1.py; it must not be regenerated).
Nothing here re-logs the model with the current code: the old folder is loaded and served as is.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_serve import post

from conftest import stop_process_group, store_client, wait_for_ping
from test_cluster_search import free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = FIXTURES / "model-format1"
IMAGES = FIXTURES / "model-format1-images"
EXPECTED = json.loads((FIXTURES / "model-format1-expected.json").read_text())
IMAGE_PATHS = [IMAGES / name for name in EXPECTED["images"]]
NAME = "tune-cells-fixture"


def encoded_images() -> list[str]:
    return [base64.b64encode(p.read_bytes()).decode() for p in IMAGE_PATHS]


def assert_expected(table: pd.DataFrame) -> None:
    assert list(table["predicted_class"]) == EXPECTED["predicted_class"]
    for column, values in EXPECTED["probabilities"].items():
        assert table[column].tolist() == pytest.approx(values, abs=1e-5), column


def test_the_fixture_is_a_format1_checkpoint():
    spec = json.loads((MODEL / "artifacts" / "checkpoint" / "model.json").read_text())
    assert spec["format"] == 1 and spec["classes"] == EXPECTED["classes"]
    assert sorted(EXPECTED["predicted_class"]) == ["a", "a", "b", "b"]  # both classes are exercised


def test_old_model_loads_and_predicts_through_mlflow_pyfunc():
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(MODEL))
    assert_expected(model.predict(pd.DataFrame({"path": [str(p) for p in IMAGE_PATHS]})))
    assert_expected(model.predict(pd.DataFrame({"image": encoded_images()})))


def test_old_checkpoint_loads_through_the_project_loader():
    from tune_cells.kinds import load_predictor

    predictor = load_predictor(MODEL / "artifacts" / "checkpoint")
    probabilities = predictor.predict_proba(np.stack([predictor.decode_path(p) for p in IMAGE_PATHS]))
    classes = EXPECTED["classes"]
    assert probabilities.shape == (len(IMAGE_PATHS), len(classes))
    for index, name in enumerate(classes):
        assert probabilities[:, index].tolist() == pytest.approx(EXPECTED["probabilities"][f"prob_{name}"], abs=1e-5)
    assert [classes[i] for i in probabilities.argmax(1)] == EXPECTED["predicted_class"]


@pytest.mark.slow
def test_old_registered_model_serves(tmp_path):
    """Register the old folder itself (uploaded as a run's `model` artifact, not re-logged) in a fresh
    store and serve `models:/NAME/1` with MLflow's model server, as `tune-cells serve` does."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = store_client(db)
    experiment = client.create_experiment("nuclei", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(experiment, run_name="format1-fixture")
    client.log_artifacts(run.info.run_id, str(MODEL), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    assert str(version.version) == "1"

    port = free_port()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1",
                                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(url, server, 90, log_path.read_text)
        body = {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded_images()]}}
        status, answer = post(url, json.dumps(body))
        assert status == 200, answer
        assert_expected(pd.DataFrame(answer["predictions"]))
    finally:  # the whole session: MLflow's server runs uvicorn workers as children
        stop_process_group(server)
