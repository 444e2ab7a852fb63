"""Options that several commands share."""

from __future__ import annotations

from pathlib import Path

import click

from tune_cells.paths import DEFAULT_WORKDIR, require_text_name

workdir_option = click.option("--workdir", type=click.Path(path_type=Path), default=DEFAULT_WORKDIR, show_default=True,
                              callback=lambda _ctx, _param, value: require_text_name(value),
                              help="Working folder: MLflow store, Ray results, split files, demo data.")
tracking_option = click.option("--tracking-uri", default=None,
                               help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite in --workdir].")
