"""The driver side of Ray Tune. Only the `ray_*` modules import Ray: its API moves between versions.

Driver side: `init`, `run_search` (and `ray_seeds.run_seeds`). The trial side is `ray_trial`.
Per-trial events reach the rest of the project through the small `TrialEvents` protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from tune_cells.errors import UserInputError
from tune_cells.promotion_rank import trial_rank
from tune_cells.ray_checkpoints import (
    MAX_FAILURES,
    best_kept_checkpoint,
    kept_checkpoints,
    placed_trainable,
    result_record_callbacks,
)
from tune_cells.ray_events import (  # noqa: F401  (TrialEvents: re-exported)
    EventsCallback,
    TrialEvents,
    first_error_line,
    forwarding_events,
    live_trials,
)
from tune_cells.ray_progress import PendingTrialsExplainer, ProgressReporter, TimeBudget, stop_on_signals
from tune_cells.ray_scheduler import ASHAKeepingRecipe
from tune_cells.ray_searcher import searcher_trials
from tune_cells.search_spaces import SearchSpace

_EventsCallback = EventsCallback  # the name searches interrupted before session 22 pickled their callback under
log = logging.getLogger(__name__)


@dataclass
class SearchRequest:
    trainable: Callable[..., None]
    trainable_kwargs: dict[str, Any]  # large objects go to the object store once, not per trial
    space: SearchSpace  # sampled define-by-run by Optuna
    metric: str
    mode: str
    samples: int
    seed: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    trial_resources: Callable[[dict], dict[str, float]]  # config -> {"CPU": n, "GPU": n}
    storage_path: str
    name: str
    events: TrialEvents | None = None
    initial_points: list[dict] = field(default_factory=list)  # in the space's plain names (`lr`, not `lr(sgd)`)
    warm_trials: list = field(default_factory=list)  # finished Optuna trials the study holds before its first (--warm-start)
    max_concurrent: int | None = None
    resume: bool = False  # continue the interrupted search at storage_path/name
    max_failures: int = MAX_FAILURES
    time_budget_s: float | None = None  # stop every trial after this long (--time-budget)
    recipe: dict | None = None  # an initial point ASHA never stops (the one-SE rule compares against its full run)


@dataclass
class TrialSummary:
    trial_id: str
    config: dict
    iterations: int
    failed: bool
    error: str | None
    best_checkpoint: tune.Checkpoint | None = None  # its best-epoch checkpoint (None: failed, or none kept)
    best_metric: float = float("nan")  # the metric at that epoch
    best_epoch: int = 0
    last_result: dict = field(default_factory=dict)
    best_metrics: dict = field(default_factory=dict)  # what it reported at its best epoch


@dataclass
class SearchResult:
    best_trial_id: str
    best_config: dict
    best_metric: float
    best_epoch: int
    best_checkpoint: tune.Checkpoint  # the best trial's best-epoch checkpoint, where Ray stored it
    trials: list[TrialSummary]
    experiment_path: str
    searcher_trials: int  # trials the Optuna study holds (one per Ray trial, also across a resume; warm-start ones not counted)
    time_budget_reached: bool = False
    stopped_by_time_budget: list[str] = field(default_factory=list)  # trials the budget stopped (their end unreported)
    best_metrics: dict = field(default_factory=dict)  # what the best trial reported at its best epoch


def init(address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None,
         object_store_bytes: int | None = None, verbose: bool = False) -> dict[str, float]:
    """Connect to a cluster (`address`) or start a local Ray; return the cluster's resources."""
    # Per-epoch checkpoints of small models trip Ray's "excessive sync" warning for no benefit.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's console tables are replaced by tune-cells' own per-trial log lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot the experiment (trials, Optuna state; Ray keeps no ASHA rungs) every few seconds rather than Ray's
    # adaptive default: the state is small, and a crash then loses at most seconds of bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune adds a TensorBoard logger by default, whose import alone delays the first trial by
    # ~2 s; MLflow is this project's record. The JSON and CSV records are added back explicitly.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not ray.is_initialized():
        # Worker output (per-checkpoint INFO lines) reaches the console only with -v; failed
        # trials are still reported, with their error, by the driver.
        common = dict(include_dashboard=False, logging_level=logging.INFO if verbose else logging.ERROR,
                      log_to_driver=verbose)
        if address:
            ray.init(address=address, **common)
        else:
            # address="local" never joins a stale cluster left in /tmp/ray. Token authentication
            # stays as Ray sets it (on by default for a new local cluster).
            with _loopback_node():
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                         object_store_memory=object_store_bytes, _node_ip_address="127.0.0.1",
                         _temp_dir=os.environ.get("TUNE_CELLS_RAY_TMPDIR"), **common)
    return ray.cluster_resources()


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Keep a local Ray's GCS, raylet, workers, agents and driver listening on 127.0.0.1 only.

    On Linux, `ray.init` replaces a loopback `_node_ip_address` by the host's routable address
    (`services.resolve_ip_for_localhost`), and every process then listens on all interfaces. It
    keeps 127.0.0.1 where Ray thinks it is on a laptop (`ray_constants.ENABLE_RAY_CLUSTER` False,
    the macOS/Windows default, read only while the node starts): so for the start of a local
    node, and nothing else, say so. A cluster (`--address`) is left alone.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray has no ray_constants.ENABLE_RAY_CLUSTER: the local Ray may listen beyond 127.0.0.1")
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def run_search(request: SearchRequest) -> SearchResult:
    try:
        with forwarding_events(request.name, request.events) as events_callback:
            return _tune(request, events_callback)
    finally:  # the per-search registries forget it, however it ended
        TimeBudget.reached.discard(request.name)
        TimeBudget.seconds_left.pop(request.name, None)


def _tune(request: SearchRequest, events_callback: tune.Callback) -> SearchResult:
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from tune_cells.ray_searcher import PlainNamesOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Earlier trials (--warm-start) go into the study before the searcher opens it: Ray's `evaluated_rewards`
    # refuses a define-by-run space, so its study is handed over (load_if_exists) with them already in it.
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name=request.name, direction="maximize" if request.mode == "max"
                        else "minimize").add_trials(request.warm_trials)
    searcher = PlainNamesOptunaSearch(
        space=request.space,
        plain=request.space.plain,  # per-case alternatives: `lr`, not also `lr(sgd)`, in the trial's config
        metric=request.metric,
        mode=request.mode,
        points_to_evaluate=[request.space.optuna_point(p) for p in request.initial_points] or None,
        # Warm-started, the same --seed would draw the earlier searches' first random configurations again.
        sampler=optuna.samplers.TPESampler(seed=hash((request.seed, len(request.warm_trials))) & 0x7FFFFFFF
                                           if request.warm_trials else request.seed),
        study_name=request.name,
        storage=storage,
    )
    if request.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=request.max_concurrent)
    scheduler = ASHAKeepingRecipe(
        recipe=request.recipe,
        time_attr="training_iteration",
        max_t=request.max_epochs,
        grace_period=request.grace_period,  # at most max_epochs: the preflight clamps it
        reduction_factor=request.reduction_factor,
    )
    trainable = placed_trainable(request.trainable, request.trainable_kwargs, request.trial_resources)
    experiment_path = f"{request.storage_path.rstrip('/')}/{request.name}"
    if request.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        with _pending_trials(request), stop_on_signals():
            try:
                return _summarise(tuner.fit(), request.metric, request.mode, request)
            except FileNotFoundError as exc:  # trial checkpoints deleted since the interruption
                raise UserInputError(f"--resume: Ray's state under {experiment_path} is incomplete "
                                     f"({Path(exc.filename or str(exc)).name} is missing): start a new search") from None
    callbacks = [events_callback, PendingTrialsExplainer(),
                 ProgressReporter(request.samples, request.max_epochs, request.metric, request.mode,
                                  search=request.name),
                 *result_record_callbacks()]
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=request.metric,
            mode=request.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=request.samples,
            reuse_actors=True,  # saves a worker start + imports per trial
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=request.name,
            storage_path=request.storage_path,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=request.max_failures),
            stop=TimeBudget(request.time_budget_s, request.name) if request.time_budget_s else None,
            checkpoint_config=kept_checkpoints(2),
            verbose=0,
        ),
    )
    with _pending_trials(request), stop_on_signals():
        results = tuner.fit()
    return _summarise(results, request.metric, request.mode, request)


def finished_search(experiment_path: str, metric: str, mode: str) -> SearchResult:
    """A finished search read back from Ray's results folder (no Ray started): its trials and their
    best checkpoints, as `run_search` returned them; e.g. to run its promotion again."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return _summarise(ResultGrid(ExperimentAnalysis(experiment_path, default_metric=metric, default_mode=mode)),
                      metric, mode)


@contextmanager
def _pending_trials(request: SearchRequest) -> Iterator[None]:
    """Let Tune start as many trials at once as there are free slots for them.

    With a searcher, Tune keeps one trial pending at a time, so the second worker only starts
    once the first is running: seconds of an idle CPU at the start of every search. Asking the
    searcher for one trial per slot is what concurrent trials do anyway.
    """
    if "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:  # the user's own setting wins
        yield
        return
    cpus_per_trial = max(request.trial_resources({}).get("CPU", 1.0), 1e-3)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_trial))
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(min(slots, request.max_concurrent or slots))
    try:
        yield
    finally:
        del os.environ["TUNE_MAX_PENDING_TRIALS_PG"]


def can_resume(storage_path: str, name: str) -> bool:
    return tune.Tuner.can_restore(f"{storage_path.rstrip('/')}/{name}")


def _summarise(results, metric: str, mode: str, request: SearchRequest | None = None) -> SearchResult:
    """Ray's results as a SearchResult; `request`: the search that just ran (its time budget's
    bookkeeping), None for a finished search read back from disk."""
    reached = request is not None and request.name in TimeBudget.reached
    live = live_trials(request.name) if request else set()
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if reached and result.error is None and not metrics.get("training_iteration") and trial_id not in live:
            continue  # still pending when the budget ran out: it never started
        failed = result.error is not None or bool(metrics.get("failure"))
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                config=result.config or {},
                iterations=int(metrics.get("training_iteration", 0)),
                failed=failed,
                error=first_error_line(result.error) or metrics.get("failure"),
                last_result=metrics,
                **({} if failed else best_kept_checkpoint(result.best_checkpoints or [], metric, mode)),
            )
        )
    scored = [r for r in results if r.error is None and r.best_checkpoints]
    if not scored:
        errors = "; ".join(t.error for t in trials if t.error)[:500]
        if reached and not any(t.iterations or t.failed for t in trials):
            raise UserInputError(f"--time-budget {request.time_budget_s / 60:g}: no trial finished an epoch within "
                                 "it; nothing promoted (give it more minutes)")
        raise RuntimeError(f"no trial produced a checkpoint ({len(trials)} trials; {errors or 'no errors'})")
    ranked = [t for t in trials if t.best_checkpoint is not None]
    if not ranked:  # checkpoints, but every one with a NaN metric
        raise RuntimeError(f"no trial kept a checkpoint with a finite {metric} ({len(trials)} trials)")
    best = max(ranked, key=lambda t: trial_rank(t, mode))  # the first best: Ray's trial order
    return SearchResult(
        best_trial_id=best.trial_id,
        best_config=best.config,
        best_metric=best.best_metric,
        best_epoch=best.best_epoch,
        best_checkpoint=best.best_checkpoint,
        trials=trials,
        experiment_path=results.experiment_path,
        searcher_trials=searcher_trials(results.experiment_path),
        time_budget_reached=reached,
        # Ray reports no end for the trials a stopper stops: those the budget cut off are still live
        stopped_by_time_budget=[t.trial_id for t in trials if reached and not t.failed and t.trial_id in live],
        best_metrics=dict(best.best_metrics),
    )
