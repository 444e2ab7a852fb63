"""The registered model a command works on, opened one way for every command (evaluate, predict,
explain, serve, export, card, promote): the task, the working folder, the MLflow store, then the
model (--model-uri, --version, else the task's champion).

Each failure is exit 2 with one line naming the culprit, the same line whichever command meets it;
nothing is created on the way (a store that is absent is reported, not made).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_cells.errors import UserInputError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # (imported when a command runs: `tune-cells --help` stays fast)
    from tune_cells.paths import WorkDir
    from tune_cells.tasks import TaskSpec
    from tune_cells.tracking import Tracker


@dataclass(frozen=True)
class OpenedModel:
    task: TaskSpec
    workdir: WorkDir
    tracker: Tracker
    uri: str  # as given, or the champion's models:/NAME@champion
    version: Any  # the registry's ModelVersion behind `uri` (its name, version and tags)


def open_registered_model(task: str, workdir: Path, tracking_uri: str | None, model_uri: str | None = None,
                          version: str | None = None, *, writes: bool = True) -> OpenedModel:
    """The model named by `model_uri` or `version` (of tune-cells-TASK, else tune-cells-TASK-demo),
    else the task's champion, checked to exist and to be a model of `task`. `writes`: the command
    writes in the working folder (so it must be writable); read-only commands (card, serve, predict,
    explain) pass False and work on a read-only folder (a store shared read-only)."""
    from tune_cells.tracking_registry import parse_model_uri

    if model_uri is not None and version is not None:  # flags first: refused before anything is opened
        raise UserInputError("--version and --model-uri name the model twice: give one")
    if model_uri is not None:
        parse_model_uri(model_uri)
    spec, workdir, tracker = open_store(task, workdir, tracking_uri, writes=writes)
    uri = model_uri_of(tracker, spec.name, model_uri, version)
    return OpenedModel(spec, workdir, tracker, uri, tracker.resolve_model(uri, spec.name))


def open_store(task: str, workdir: Path, tracking_uri: str | None, *,
               writes: bool) -> tuple[TaskSpec, WorkDir, Tracker]:
    """The task, the working folder and its MLflow store, which must exist."""
    from tune_cells.paths import WorkDir
    from tune_cells.preflight import check_workdir
    from tune_cells.tasks import get_task
    from tune_cells.tracking import Tracker, resolve_tracking_uri

    spec = get_task(task)
    workdir = check_workdir(workdir) if writes else WorkDir.at(workdir)
    tracker = Tracker(resolve_tracking_uri(tracking_uri, workdir), workdir.artifacts)
    require_store(tracker, workdir, spec.name)
    return spec, workdir, tracker


def require_store(tracker: Tracker, workdir: WorkDir, task: str = "TASK") -> None:
    """Refuse a store that is not there (an absent sqlite file, also when its folder is absent)
    rather than let MLflow create an empty one; the hint names the flag that points at it. An
    existing sqlite file must be an MLflow store (MLflow would add its tables to any database); a
    server must answer and a database needs its driver (MLflow would retry for minutes, or fail
    over many lines)."""
    from tune_cells.tracking_checks import artifact_folders_elsewhere, check_sqlite_store, check_store, sqlite_path

    if tracker.tracking_uri == f"sqlite:///{workdir.mlflow_db}":  # the workdir's own store (the default)
        name, value = "--workdir", workdir.root
    else:
        name, value = "--tracking-uri", tracker.tracking_uri
    if not tracker.store_exists():
        raise UserInputError(f"no MLflow store at {tracker.tracking_uri}: run `tune-cells search {task} {name} "
                             f"{value}` first, or give the {name} that search used")
    path = sqlite_path(tracker.tracking_uri)
    if path is not None:
        locations = check_sqlite_store(path)
        elsewhere = artifact_folders_elsewhere(locations, workdir.root) if name == "--workdir" else []
        if elsewhere:  # the artifacts a command logs land there, not in this folder
            log.warning("%s keeps its artifacts in %s, outside %s (a working folder copied from there?): what this "
                        "command logs is written there", path, elsewhere[0], workdir.root)
    else:
        from_variable = os.environ.get("MLFLOW_TRACKING_URI") == tracker.tracking_uri
        check_store(tracker.tracking_uri, "MLFLOW_TRACKING_URI" if from_variable else "--tracking-uri")


def model_uri_of(tracker: Tracker, task: str, model_uri: str | None, version: str | None) -> str:
    """The URI of the model a command was asked for: --model-uri, --version N, else the champion."""
    if model_uri is not None:
        return model_uri
    if version is not None:
        return f"models:/{tracker.model_name_with_version(task, version)}/{version}"
    return tracker.champion_uri(task)

