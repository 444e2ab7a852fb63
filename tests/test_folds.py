"""`--folds 3` end to end on demo data: each trial trains three fold models; the champion is their
ensemble, whose probabilities (evaluate, predict, the MLflow model) are the mean of its members'."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow

SPACE = """
params:
  model: small_convnet
  depth: 2
  width: 12
  lr: {float: [2.0e-3, 5.0e-3], log: true}
  batch_size: 32
  image_size: 40
"""


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    (root / "space.yaml").write_text(SPACE)
    workdir = root / "w"
    result = cli_subprocess(["search", "nuclei", "--folds", 3, "--samples", 2, "--max-epochs", 2, "--space",
                             root / "space.yaml", "--workdir", workdir], cwd=root)
    assert result.code == 0, result.err[-3000:]
    return root, workdir, result


def test_the_champion_is_a_three_member_ensemble_evaluated_as_one(folded):
    from tune_cells.tracking import Tracker

    root, workdir, result = folded
    client = store_client(workdir / "mlflow.db")
    search = client.search_runs([client.get_experiment_by_name("tune-cells-nuclei-demo").experiment_id],
                                "tags.`tune_cells.run_type` = 'search'")[0]
    assert search.data.params["folds"] == "3"
    evaluation = client.search_runs([search.info.experiment_id], "tags.`tune_cells.run_type` = 'evaluation'")[0]
    assert "test_accuracy" in evaluation.data.metrics and "test_ece" in evaluation.data.metrics
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlartifacts")
    ensemble = tracker.load_classifier("models:/tune-cells-nuclei-demo@champion")
    assert ensemble.spec.members == ["fold0", "fold1", "fold2"] and len(ensemble.members) == 3


def test_served_and_predicted_probabilities_are_the_mean_of_the_members(folded):
    import mlflow.pyfunc
    import torch

    from tune_cells.tracking import Tracker

    root, workdir, _ = folded
    images = sorted((workdir / "demo-data" / "nuclei" / "train").glob("*.png"))[:6]
    output = root / "predicted.csv"
    predicted = cli_subprocess(["predict", "nuclei", *images, "--workdir", workdir, "--output", output], cwd=root)
    assert predicted.code == 0, predicted.err
    table = pd.read_csv(output)
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlartifacts")
    ensemble = tracker.load_classifier("models:/tune-cells-nuclei-demo@champion")
    decoded = np.stack([ensemble.decode_path(p) for p in images])
    members = np.mean([torch.softmax(logits / ensemble.spec.temperature, 1).numpy()
                       for logits in ensemble.member_logits(decoded)], axis=0)
    columns = [f"prob_{c}" for c in ensemble.spec.classes]
    np.testing.assert_allclose(table[columns].to_numpy(), members, atol=1e-6)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    served = mlflow.pyfunc.load_model("models:/tune-cells-nuclei-demo@champion").predict(
        pd.DataFrame({"path": [str(p) for p in images]}))
    np.testing.assert_allclose(served[columns].to_numpy(), members, atol=1e-6)
