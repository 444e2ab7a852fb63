"""`tune-cells ui`: the MLflow UI on this project's runs."""

from __future__ import annotations

import os
import sys

import click

from tune_cells.commands.opening import require_store
from tune_cells.commands.options import tracking_option, workdir_option
from tune_cells.redact import without_credentials


@click.command("ui")
@workdir_option
@tracking_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you mean it.")
def command(workdir, tracking_uri, port, host):
    """Start the MLflow UI on this project's runs."""
    from tune_cells.listening import check_listen
    from tune_cells.paths import WorkDir
    from tune_cells.tracking import Tracker, resolve_tracking_uri, runs_page

    check_listen(host, port)  # MLflow's server would log a bind failure over several lines and exit 0
    workdir = WorkDir.at(workdir)
    uri = resolve_tracking_uri(tracking_uri, workdir)
    tracker = Tracker(uri, workdir.artifacts)
    require_store(tracker, workdir)  # mlflow ui would create an empty one
    base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    click.echo(f"MLflow UI on {base} for {without_credentials(uri)} (Ctrl-C stops it)")
    latest = tracker.latest_search_anywhere()
    if latest is not None:  # MLflow 3.17 opens on its GenAI pages: this link opens the runs table of the search
        click.echo(f"Latest search ({latest.info.run_name}), its trials, metrics, dataset and model:\n  "
                   f"{runs_page(base, latest.info.experiment_id)}")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execvpe(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                                "--port", str(port), "--workers", "1"], env)
