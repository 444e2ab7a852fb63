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
    result = cli_subprocess(["evaluate", "nuclei", "--seeds", 2, "--bootstrap", 100, "--workdir", searched["workdir"]],
                            cwd=searched["root"])
    assert result.code == 0, result.err[-2000:]
    row = next(line for line in result.out.splitlines() if line.startswith("test_accuracy"))
    assert "±" in row and "[" in row
    runs = searched["client"].search_runs([searched["experiment"].experiment_id],
                                          "tags.evaluation_kind = 'seeds'")
    assert len(runs) == 1 and runs[0].data.params["retrains"] == "2"
    assert 0 <= runs[0].data.metrics["test_accuracy_seed_mean"] <= 1


def test_mlflow_ui_renders_the_search_runs_in_chromium(searched):
    browser = chromium()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tune_cells", "ui", "--workdir", searched["workdir"], "--port",
                               str(port)], cwd=searched["root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
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
        experiment_id = searched["experiment"].experiment_id
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
        dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--virtual-time-budget=30000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
        assert "tune-cells-nuclei-demo" in dom or f"Experiment {experiment_id}" in dom
        assert search_run(searched).info.run_name in dom, dom[-2000:]  # the runs table rendered, not a shell
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
