"""Typed views of what a search logs in MLflow: its parent run, its trial runs and the model
version it registers. Each logged key is read here once, with the value a run that never logged it
(an older version's) stands for, instead of string dicts read in each command."""

from __future__ import annotations

from dataclasses import dataclass

from tune_cells.search_options import SearchOptions

PARENT_TAG = "mlflow.parentRunId"
RUN_TYPE_TAG = "tune_cells.run_type"  # search | trial | retrain | evaluation
STOPPED_BY_TIME_BUDGET = "stopped_by_time_budget"  # a trial's tag, and a mark on the last result the search forwards


@dataclass(frozen=True)
class LoggedSearch:
    """A search (parent) run: what it was started with and how its promotion went."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    task: str
    classes: str  # comma-joined and cut to a parameter's length, as logged
    space: str  # the --space it was started with (a path or a built-in space's name)
    metric: str | None  # None: a run from before the metric was logged
    mode: str | None
    max_epochs: int
    folds: int
    resumes: int
    ray_experiment: str
    split_file: str | None
    split_sha256: str | None
    best_trial_id: str  # "" until promoted
    model_version: str  # "" until promoted
    selection: str
    latency_protocol: str | None
    latency_budget_ms: float | None  # its --max-latency-ms

    @classmethod
    def of(cls, run) -> LoggedSearch:
        params, tags = run.data.params, run.data.tags
        budget = tags.get("latency_budget_ms", "none")
        return cls(
            run_id=run.info.run_id, name=run.info.run_name, status=run.info.status,
            experiment_id=run.info.experiment_id,
            task=tags.get("task", params.get("task", "")), classes=params.get("classes", ""),
            space=params.get("space", ""), metric=params.get("metric"), mode=params.get("mode"),
            max_epochs=int(params.get("max_epochs", SearchOptions.max_epochs)),
            folds=int(params.get("folds", SearchOptions.folds)), resumes=int(tags.get("resumes", 0)),
            ray_experiment=tags.get("ray_experiment", ""), split_file=tags.get("split_file"),
            split_sha256=tags.get("split_sha256"), best_trial_id=tags.get("best_trial_id", ""),
            model_version=tags.get("model_version", ""), selection=tags.get("selection", ""),
            latency_protocol=tags.get("latency_protocol"),
            latency_budget_ms=_float_or_none(budget),
        )


@dataclass(frozen=True)
class LoggedTrial:
    """A trial's (or a retrain's) run: which Ray trial it records and how it ended."""

    run_id: str
    status: str
    parent_run_id: str
    ray_trial_id: str  # "" for a run that never named its trial
    seed: int | None  # a retrain's seed
    stopped_early: bool  # by ASHA
    stopped_by_time_budget: bool
    failure: str
    latency_device: str

    @classmethod
    def of(cls, run) -> LoggedTrial:
        tags = run.data.tags
        return cls(
            run_id=run.info.run_id, status=run.info.status, parent_run_id=tags.get(PARENT_TAG, ""),
            ray_trial_id=tags.get("ray_trial_id", ""), seed=int(tags["seed"]) if "seed" in tags else None,
            stopped_early=tags.get("stopped_early") == "true",
            stopped_by_time_budget=tags.get(STOPPED_BY_TIME_BUDGET) == "true",
            failure=tags.get("failure", ""), latency_device=tags.get("latency_device", ""),
        )


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "none": no budget
        return None


@dataclass(frozen=True)
class LoggedVersion:
    """Where a registered model version came from (its tags): the search, trial and split it was
    trained under, and the networks an ensemble joins."""

    name: str
    version: str
    task: str  # "" for a version registered without one
    search_run_id: str
    trial_run_id: str
    ray_trial_id: str
    data_root: str
    split_file: str
    split_seed: int
    ensemble_seeds: list[int]  # an ensemble of retrains: one seed per network; [] for one network
    ensemble_trials: bool  # an ensemble of the search's own trials (their specs are in the model)
    latency_budget_ms: float | None  # the --max-latency-ms it was promoted under

    @classmethod
    def of(cls, version) -> LoggedVersion:
        tags = version.tags
        seeds = tags.get("ensemble_seeds", "")
        return cls(
            name=version.name, version=str(version.version), task=tags.get("task", ""),
            search_run_id=tags.get("search_run_id", ""), trial_run_id=tags.get("trial_run_id", ""),
            ray_trial_id=tags.get("ray_trial_id", ""), data_root=tags.get("data_root", ""),
            split_file=tags.get("split_file", ""), split_seed=int(tags.get("split_seed", 0)),
            ensemble_seeds=[int(seed) for seed in seeds.split(",")] if seeds else [],
            ensemble_trials=bool(tags.get("ensemble_trials")),
            latency_budget_ms=_float_or_none(tags.get("latency_budget_ms", "none")),
        )
