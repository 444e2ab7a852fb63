"""The out-of-the-box runs: `--smoke-test`, and the default demo search that `./run demo` starts."""

import pytest

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow


def test_smoke_test_flag_runs_a_tiny_search(tmp_path):
    result = cli_subprocess(["search", "nuclei", "--smoke-test", "--workdir", tmp_path / "w"], cwd=tmp_path)
    assert result.code == 0, result.err[-2000:]
    assert "2 trials" in result.out and "Promoted: models:/tune-cells-nuclei-demo@champion" in result.out
    assert "test_balanced_accuracy" in result.out


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
