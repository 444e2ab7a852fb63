"""`tune-cells ui`: the MLflow UI on this project's runs."""

from __future__ import annotations

import os
import sys

import click

from tune_cells.commands.opening import require_store
from tune_cells.commands.options import tracking_option, workdir_option
from tune_cells.errors import UserInputError
from tune_cells.redact import without_credentials


@click.command("ui")
@workdir_option
@tracking_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you mean it.")
def command(workdir, tracking_uri, port, host):
    """Start the MLflow UI on this project's runs (a local or database store: a tracking server has its own)."""
    from tune_cells.listening import base_url, check_listen
    from tune_cells.paths import WorkDir
    from tune_cells.tracking import Tracker, resolve_tracking_uri, runs_page

    workdir = WorkDir.at(workdir)
    uri = resolve_tracking_uri(tracking_uri, workdir)
    refuse_remote(uri, "--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI")
    check_listen(host, port)  # MLflow's server would log a bind failure over several lines and exit 0
    tracker = Tracker(uri, workdir.artifacts)
    require_store(tracker, workdir)  # mlflow ui would create an empty one; an unknown scheme is refused there
    base = base_url(host, port)
    click.echo(f"MLflow UI on {base} for {without_credentials(uri)} (Ctrl-C stops it)")
    latest = tracker.latest_search_anywhere()
    if latest is not None:  # MLflow 3.17 opens on its GenAI pages: this link opens the runs table of the search
        click.echo(f"Latest search ({latest.info.run_name}), its trials, metrics, dataset and model:\n  "
                   f"{runs_page(base, latest.info.experiment_id)}")
    # The store by environment, never on the command line: anyone on the machine can read a process's
    # arguments (ps), and a database URI may hold a password.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": uri}
    os.execvpe(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
                                "--workers", "1"], env)


def refuse_remote(uri: str, given_as: str) -> None:
    """A tracking server or a Databricks workspace already shows its runs in its own UI, and MLflow's
    UI cannot be started on one (it fails over 30 lines, quoting the URI's password)."""
    from urllib.parse import urlparse

    from tune_cells.tracking_checks import split_credentials

    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        raise UserInputError(f"{given_as} {without_credentials(uri)}: a tracking server has its own UI: open "
                             f"{split_credentials(uri)[0]} in a browser instead of `tune-cells ui`")
    if uri.startswith("databricks") or scheme == "uc":
        raise UserInputError(f"{given_as} {without_credentials(uri)}: open the runs in your Databricks "
                             "workspace instead of `tune-cells ui`")
