"""Every classification task end to end on generated data in its own original layout (hep2's
ICPR folders and greyscale cells, ALL-IDB file names, bring-your-own class folders): a search,
a promoted champion and a held-out evaluation run. (Nuclei and lung have their own modules.)"""

from __future__ import annotations

import pytest

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow

TINY_SPACE = """
params:
  model: small_convnet
  depth: 2
  width: 8
  optimizer: adamw
  lr: {float: [1.0e-3, 3.0e-3], log: true}
  batch_size: 32
  image_size: 32
"""


@pytest.mark.parametrize("task,layout", [
    ("hep2", "training/"), ("leukemia", "ALL_IDB2"), ("folder", "normal_epithelial/"),
])
def test_task_searches_promotes_and_evaluates_on_its_own_layout(task, layout, tmp_path):
    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    workdir = tmp_path / "w"
    result = cli_subprocess(["search", task, "--samples", 2, "--max-epochs", 2, "--grace-period", 1,
                             "--space", tmp_path / "space.yaml", "--workdir", workdir], cwd=tmp_path)
    assert result.code == 0, result.err[-3000:]
    assert any(layout in str(p) for p in (workdir / "demo-data" / task).rglob("*"))  # data in the real layout
    client = store_client(workdir / 'mlflow.db')
    experiment = client.get_experiment_by_name(f"tune-cells-{task}-demo")
    runs = client.search_runs([experiment.experiment_id])
    kinds = [r.data.tags.get("tune_cells.run_type") for r in runs]
    assert kinds.count("search") == 1 and kinds.count("trial") == 2 and kinds.count("evaluation") == 1
    evaluation = next(r for r in runs if r.data.tags.get("tune_cells.run_type") == "evaluation")
    assert 0.0 <= evaluation.data.metrics["test_balanced_accuracy"] <= 1.0
    champion = client.get_model_version_by_alias(f"tune-cells-{task}-demo", "champion")
    assert champion.tags["task"] == task
