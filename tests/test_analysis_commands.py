"""After a search: report, explain, evaluate --seeds, the live progress line, and the MLflow UI
rendered in a real headless Chromium. One small real search (Ray + Optuna + ASHA + MLflow) feeds all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from PIL import Image

from conftest import chromium, cli_subprocess, free_port

pytestmark = pytest.mark.slow

def search_run(searched):
    runs = searched["client"].search_runs([searched["experiment"].experiment_id], "tags.`tune_cells.run_type` = 'search'")
    assert len(runs) == 1
    return runs[0]


def test_progress_line_during_the_search(searched):
    lines = [line for line in searched["result"].err.splitlines() if "progress:" in line]
    assert lines, searched["result"].err[-2000:]
    assert "4/4 trials done" in lines[-1] and "best val_balanced_accuracy" in lines[-1]


def test_report_builds_table_plots_and_page_and_logs_them(searched):
    result = cli_subprocess(["report", "--experiment", "tune-cells-nuclei-demo", "--workdir", searched["workdir"]],
                            cwd=searched["root"])
    assert result.code == 0, result.err[-2000:]
    parent = search_run(searched)
    folder = searched["workdir"] / "reports" / parent.info.run_name
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 and trials["champion"].sum() == 1
    assert trials["stopped_early"].sum() >= 1  # the lr 1e-7 trial
    assert {"param_lr", "param_width", "best_value", "epochs", "status"} <= set(trials.columns)
    page = (folder / "report.html").read_text()
    for png in ("learning_curves.png", "best_so_far.png", "param_importance.png", "parallel_coordinates.png"):
        with Image.open(folder / png) as image:  # real, full-size figures
            assert image.width >= 600 and image.height >= 300
        assert f'src="{png}"' in page
    assert parent.info.run_name in page
    logged = {f.path for f in searched["client"].list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/trials.csv", "report/learning_curves.png"} <= logged


def test_explain_writes_an_attribution_grid_per_image(searched):
    images = sorted((searched["workdir"] / "demo-data" / "nuclei" / "train").glob("*.png"))[:2]
    output = searched["root"] / "explained"
    result = cli_subprocess(["explain", "nuclei", *images, "--workdir", searched["workdir"], "--output", output,
                             "--steps", 8], cwd=searched["root"])
    assert result.code == 0, result.err[-2000:]
    for image in images:
        with Image.open(output / f"{image.stem}_attributions.png") as grid:
            assert grid.width > 3 * grid.height  # input + three attribution maps side by side
    assert "2 attribution grids" in result.out


def test_seeds_report_mean_and_sd_beside_the_champion(searched):
    """Three retrains (the champion's seed 3 + 1000, 1001, 1002), one of which diverges (a
    failpoint): the other two are scored and reported, the third is named with why."""
    storage = searched["root"] / "seeds-storage"  # where a cluster's shared storage would be
    result = cli_subprocess(["evaluate", "nuclei", "--seeds", 3, "--bootstrap", 100, "--workdir", searched["workdir"],
                             "--storage", storage], cwd=searched["root"], env_extra={"TUNE_CELLS_FAIL_AT": "diverge:seed1004"})
    assert result.code == 0, result.err[-2000:]
    assert [p.name for p in storage.iterdir()][0].startswith("seeds-")  # the retrains' Ray experiment
    assert "retrained under seeds 1003, 1004, 1005" in result.out and "mean ± sd over 2 retrains" in result.out
    row = next(line for line in result.out.splitlines() if line.startswith("test_accuracy"))
    assert "±" in row and "[" in row
    assert ("The retrain under seed 1004 failed (diverged at epoch 1: training loss became nan (failpoint "
            "diverge:seed1004)): not in the mean, which is over the 2 of 3 that trained.") in result.out
    runs = searched["client"].search_runs([searched["experiment"].experiment_id],
                                          "tags.evaluation_kind = 'seeds'")
    assert len(runs) == 1 and runs[0].data.params["retrains"] == "3" and runs[0].data.params["failed_seeds"] == "1004"
    assert runs[0].data.tags["failed_retrains"].startswith("seed 1004: diverged at epoch 1")
    assert 0 <= runs[0].data.metrics["test_accuracy_seed_mean"] <= 1


def test_seeds_where_every_retrain_fails_end_in_one_line_and_log_no_evaluation(searched):
    """`--seeds 2` whose two retrains (seeds 1003 and 1004) both diverge: nothing to report, so one
    line naming the first seed and why, exit 1, and no seeds evaluation run beside the earlier one."""
    client, experiment_id = searched["client"], searched["experiment"].experiment_id
    before = len(client.search_runs([experiment_id], "tags.evaluation_kind = 'seeds'"))
    result = cli_subprocess(["evaluate", "nuclei", "--seeds", 2, "--bootstrap", 100, "--workdir", searched["workdir"],
                             "--storage", searched["root"] / "seeds-all-fail"], cwd=searched["root"],
                            env_extra={"TUNE_CELLS_FAIL_AT": "diverge:seed1003,diverge:seed1004"})
    assert result.code == 1, result.err[-2000:]
    lines = [line for line in result.err.splitlines() if line.startswith("tune-cells:")]
    assert lines == ["tune-cells: failed: RetrainFailed: the retrain under seed 1003 failed: diverged at epoch 1: "
                     "training loss became nan (failpoint diverge:seed1003) (run with -v for the traceback)"], lines
    assert len(client.search_runs([experiment_id], "tags.evaluation_kind = 'seeds'")) == before


def test_mlflow_ui_renders_the_search_runs_in_chromium(searched, tmp_path):
    """The link `tune-cells ui` prints opens the search's runs table in MLflow's model-training view
    (not its GenAI pages), the search run expanded, its row showing the dataset and the task's
    metric without any configuration, and the champion in the Models column."""
    browser = chromium()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tune_cells", "ui", "--workdir", searched["workdir"], "--port",
                               str(port)], cwd=searched["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        printed = [server.stdout.readline() for _ in range(3)]  # printed before MLflow starts
        url = printed[2].strip()
        experiment_id = searched["experiment"].experiment_id
        assert url == (f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                       "&viewStateShareKey=tune-cells"), printed
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "MLflow UI did not start"
            time.sleep(0.5)
        # Wide enough that the grid renders every column it shows (it leaves columns out of view out of the DOM).
        flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--virtual-time-budget=30000", "--window-size=2400,1000"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        subprocess.run([*flags, f"--screenshot={tmp_path / 'mlflow-ui-runs.png'}", url], capture_output=True,
                       timeout=180)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    search = search_run(searched)
    rows = row_texts(dom)
    assert search.info.run_id in rows, dom[-2000:]  # the runs table rendered, not a shell
    assert "Training runs" not in dom and "Evaluation runs" not in dom  # the GenAI navigation is not shown
    (dataset,) = searched["client"].get_run(search.info.run_id).inputs.dataset_inputs
    row = rows[search.info.run_id]
    assert f"{dataset.dataset.name} ({dataset.dataset.digest})" in row, row
    assert repr(search.data.metrics["best_val_balanced_accuracy"]) in row, row  # the metric column, unconfigured
    assert "tune-cells search nuclei" in row  # its source
    champion = searched["client"].get_model_version("tune-cells-nuclei-demo", "1").tags["trial_run_id"]
    assert "tune-cells-nuclei-demo" in rows[champion]  # expanded: the best trial's row and its model
    with Image.open(tmp_path / "mlflow-ui-runs.png") as shot:
        assert shot.size == (2400, 1000)


def row_texts(dom: str) -> dict[str, str]:
    """The text of each runs-table row (AG Grid's `row-id`: the run id), its cells joined by ' | '."""
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: dict[str, list[str]] = {}
            self.stack: list[str | None] = []  # per open div: the row it belongs to

        def handle_starttag(self, tag, attrs):
            if tag == "div":
                row = dict(attrs).get("row-id") or (self.stack[-1] if self.stack else None)
                self.stack.append(row)

        def handle_endtag(self, tag):
            if tag == "div" and self.stack:
                self.stack.pop()

        def handle_data(self, data):
            if self.stack and self.stack[-1] and data.strip():
                self.rows.setdefault(self.stack[-1], []).append(data.strip())

    parser = Rows()
    parser.feed(dom)
    return {row: " | ".join(parts) for row, parts in parser.rows.items()}
