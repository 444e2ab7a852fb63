"""What every bench script's command line shares: its docstring as help, the dataset, the seed and
where its runs are kept; and MLflow kept quiet, so the bench's own table is what a run prints."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def bench_parser(doc: str | None, workdir: str, *, demo_data: bool = False,
                 workdir_help: str | None = None) -> argparse.ArgumentParser:
    """`--data` (required, or the generated demo data with `demo_data`), `--seed` (0) and `--workdir`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=not demo_data,
                        help="dataset folder [default: the generated demo data]" if demo_data
                        else "dataset folder in the task's layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(workdir), help=workdir_help)
    return parser


def quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
