"""The out-of-the-box run: the default demo search that `./run demo` starts. (`--smoke-test`, the
other, runs in test_exposure against a password-protected tracking server: one search for both.)"""

import pytest

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1600)  # ~5 min here; the global 900 s limit is too tight on a busy machine
def test_default_demo_search_learns_what_mean_colour_cannot(tmp_path):
    # Same flags as `./run demo` (defaults only). Mean colour scores < 0.6: see test_demo_data.
    result = cli_subprocess(["search", "nuclei", "--workdir", tmp_path / "w"], cwd=tmp_path, timeout=1500)
    assert result.code == 0, result.err[-2000:]
    client = store_client(tmp_path / 'w' / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    evaluation = client.search_runs([experiment.experiment_id], "tags.`tune_cells.run_type` = 'evaluation'")
    assert len(evaluation) == 1
    assert evaluation[0].data.metrics["test_balanced_accuracy"] >= 0.75
