"""Everything tune-cells asks of MLflow, in one module: MLflow's API moves between versions.

All logging happens in the driver process through one MlflowClient (works on a cluster and
avoids sqlite write races between trial processes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune_cells.logged_runs import PARENT_TAG, RUN_TYPE_TAG, LoggedTrial  # noqa: F401  (re-exported)
from tune_cells.paths import WorkDir
from tune_cells.redact import without_credentials  # noqa: F401  (re-exported: callers import it from here)
from tune_cells.tracking_registry import (  # noqa: F401  (re-exported: callers import them from here)
    CHALLENGER,
    CHAMPION,
    MODEL_CODE_FILE,
    PREVIOUS_CHAMPION,
    RegistryMixin,
    is_absent,
    logged_model_id,
    model_checkpoint,
)

log = logging.getLogger(__name__)

RETRAIN_PURPOSE_TAG = "retrain_purpose"  # a retrain run's reason: ensemble_member | seeds_evaluation
# MLflow UI: model development (not GenAI) experiments, evaluation runs marked (their search shows expanded),
# a run's description (Markdown), and the shared view of the runs table that `runs_page` opens.
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
EVALUATION_RUN_TAGS = {"mlflow.runType": "evaluation"}
NOTE_TAG, VIEW_KEY = "mlflow.note.content", "tune-cells"
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(explicit: str | None, workdir: Path) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{WorkDir.at(workdir).mlflow_db}"


def is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


class Tracker(RegistryMixin):
    def __init__(self, tracking_uri: str, artifact_root: Path):
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root).resolve()
        self._client: MlflowClient | None = None

    def __getstate__(self):  # Ray pickles callbacks with the experiment state; clients do not pickle
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            if not is_local_store(self.tracking_uri):  # a server that may stop answering
                from tune_cells.tracking_guard import LostServerGuard

                self._client = LostServerGuard(self._client, self.tracking_uri)
        return self._client

    def store_exists(self) -> bool:
        """False for a sqlite store whose file is absent (so read-only commands do not create it)."""
        from tune_cells.tracking_checks import sqlite_path

        path = sqlite_path(self.tracking_uri)
        return path is None or path.exists()

    # --- runs ---------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":  # (the preflight said so unless deleted since)
            from tune_cells.errors import UserInputError
            from tune_cells.tracking_checks import deleted_experiment

            raise UserInputError(deleted_experiment(self.tracking_uri, name, found.experiment_id))
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before tune-cells tagged its experiments
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
            return found.experiment_id
        location = None
        if is_local_store(self.tracking_uri):
            # With sqlite the default artifact root is ./mlruns relative to the cwd: pin it.
            location = (self.artifact_root / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})

    def set_runs_view(self, experiment_id: str, metrics: list[str]) -> None:
        """The runs table as `runs_page` opens it (MLflow's shared view state, an experiment tag):
        these metric columns first, then each run's model, dataset and source."""
        columns = [f"metrics.`{m}`" for m in metrics] + [f"attributes.`{a}`" for a in ("Models", "Dataset", "Source")]
        widths = {f"metrics.`{m}`": 20 + 8 * len(m) for m in metrics}
        self.client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(
            {"selectedColumns": columns, "columnOrder": columns, "columnWidths": widths}))

    def start_run(self, experiment_id: str, name: str, run_type: str, parent_run_id: str | None = None,
                  tags: dict | None = None, source: str | None = None) -> str:
        all_tags = {RUN_TYPE_TAG: run_type, **(EVALUATION_RUN_TAGS if run_type == "evaluation" else {}), **(tags or {})}
        if source:  # the command, the UI's Source column
            all_tags.update({"mlflow.source.name": source, "mlflow.source.type": "LOCAL"})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, run_id: str, dataset, context: str) -> None:
        """A DatasetRecord (tune_cells.data.splits) as an MLflow dataset input, used for `context`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        record = Dataset(dataset.name, dataset.digest, "local", json.dumps({"uri": dataset.uri}),
                         profile=json.dumps(dataset.profile))
        self.client.log_inputs(run_id, [DatasetInput(record, [InputTag("mlflow.data.context", context)])])

    def link_model(self, run_id: str, version, as_input: bool = False) -> None:
        """The logged model behind a registry version, as an output of `run_id` (a search: the run page
        lists it) or an input (an evaluation). Once: a resumed promotion does not add it twice."""
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        model_id = logged_model_id(version)
        if model_id is not None and as_input:
            self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])  # (merged: idempotent)
        elif model_id is not None and all(m.model_id != model_id for m in self.get_run(run_id).outputs.model_outputs):
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])

    def download_artifact(self, run_id: str, path: str, folder: Path | str) -> Path | None:
        """A run's artifact downloaded into `folder`; None where the run or the artifact is absent
        (older versions logged less). A store that fails is raised as it is, never read as absent."""
        try:
            fetched = Path(self.client.download_artifacts(run_id, path, str(folder)))
        except MlflowException as exc:
            if not is_absent(exc):
                raise
            return None
        except OSError:  # a local artifact folder without the file
            return None
        return fetched if fetched.exists() else None

    def artifact_text(self, run_id: str, path: str) -> str | None:
        """A text artifact of a run; None where it is absent (`download_artifact`)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fetched = self.download_artifact(run_id, path, tmp)
            return fetched.read_text() if fetched is not None and fetched.is_file() else None

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents (under `artifact_path`)."""
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def latest_search(self, experiment_name: str):
        """The most recently started search (parent) run of an experiment, or None."""
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return None
        runs = self.client.search_runs([experiment.experiment_id], f"tags.`{RUN_TYPE_TAG}` = 'search'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def latest_search_anywhere(self):
        """The most recently started search run in any experiment of the store, or None."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(experiments, f"tags.`{RUN_TYPE_TAG}` = 'search'",
                                       order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
        return runs[0] if runs else None

    def metric_history(self, run_id: str, key: str):
        return sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))

    def trial_children(self, experiment_id: str, parent_run_id: str):
        return self.client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{RUN_TYPE_TAG}` = 'trial'",
            max_results=10000)

    def retrain_children(self, experiment_id: str, parent_run_id: str, purpose: str, finished_only: bool = False):
        """A search's retrain runs (trial_recorder.recording_retrains) of one purpose, oldest first."""
        query = (f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{RUN_TYPE_TAG}` = 'retrain' and "
                 f"tags.`{RETRAIN_PURPOSE_TAG}` = '{purpose}'" + (" and attributes.status = 'FINISHED'" if finished_only else ""))
        return self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=10000)

    def supersede_run(self, run_id: str, reason: str) -> None:
        """A run whose work is being redone: ended (KILLED if still RUNNING), tagged why, and soft-deleted,
        so the UI lists only the run that replaces it (restorable in MLflow)."""
        if self.get_run(run_id).info.status == "RUNNING":
            self.end_run(run_id, "KILLED")
        self.set_tags(run_id, {"superseded": reason})
        self.client.delete_run(run_id)

    def runs_of_type(self, experiment_id: str, run_type: str, finished_only: bool = False):
        """Every run of one type (search | trial | evaluation) in an experiment, oldest first."""
        query = f"tags.`{RUN_TYPE_TAG}` = '{run_type}'" + (" and attributes.status = 'FINISHED'" if finished_only else "")
        return self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"],
                                       max_results=10000)

    def trial_runs(self, experiment_id: str, parent_run_id: str) -> dict[str, str]:
        """Ray trial id → MLflow run id of a search's trial runs (persisted as the runs' tags)."""
        trials = [LoggedTrial.of(run) for run in self.trial_children(experiment_id, parent_run_id)]
        return {trial.ray_trial_id: trial.run_id for trial in trials if trial.ray_trial_id}

    def kill_running_trial_runs(self, experiment_id: str, parent_run_id: str) -> None:
        """An interrupted search: its unfinished trial runs end KILLED (a resume reopens them)."""
        for run in self.trial_children(experiment_id, parent_run_id):
            if run.info.status == "RUNNING":
                self.end_run(run.info.run_id, "KILLED")

    def end_orphaned_trial_runs(self, experiment_id: str, parent_run_id: str, trial_failed: dict[str, bool]) -> None:
        """After a (resumed) search: no trial run stays RUNNING. A run whose trial Ray finished gets
        that trial's status; one Ray no longer knows (started just before a crash, after Ray's last
        state snapshot) is KILLED, and deleted (soft) if it never reported an epoch."""
        for run in self.trial_children(experiment_id, parent_run_id):
            if run.info.status != "RUNNING":
                continue
            trial_id = LoggedTrial.of(run).ray_trial_id
            if trial_id in trial_failed:
                self.end_run(run.info.run_id, "FAILED" if trial_failed[trial_id] else "FINISHED")
                continue
            self.set_tags(run.info.run_id, {"failure": "lost when the search was interrupted"})
            self.end_run(run.info.run_id, "KILLED")
            if not run.data.metrics:  # started but never reported: Ray's state and Optuna's lack it too,
                self.client.delete_run(run.info.run_id)  # so hide it (soft delete, restorable in MLflow)

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def find_run(self, run_id: str):
        """The run, or None when the store has no such run (a user-given id)."""
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    # --- models -------------------------------------------------------------------------

    @contextmanager
    def _fluent(self, run_id: str | None) -> Iterator[None]:
        """MLflow's fluent API reads global state: set it for one call, then put it back.

        `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ, so the
        environment is restored exactly, not through MLflow's setters.
        """
        from mlflow.tracking._model_registry import utils as registry_globals
        from mlflow.tracking._tracking_service import utils as tracking_globals

        saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        # Private, but the only way to put back "unset": the public getters return resolved defaults.
        saved_uris = (getattr(tracking_globals, "_tracking_uri", None), getattr(registry_globals, "_registry_uri", None))
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            if run_id is None:
                yield
            else:
                status = self.client.get_run(run_id).info.status
                with mlflow.start_run(run_id=run_id):
                    yield
                self.client.set_terminated(run_id, status)  # reopening must not change its status
        finally:
            tracking_globals._tracking_uri, registry_globals._registry_uri = saved_uris
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def runs_page(base_url: str, experiment_id: str) -> str:
    """The UI's runs table in its model-training view (MLflow 3.17 opens its GenAI view unless the
    URL says otherwise, whatever the experiment's kind), as `set_runs_view` stored it."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
