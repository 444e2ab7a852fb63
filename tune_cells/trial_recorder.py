"""Ray trial events → MLflow runs: the `TrialEvents` seam between the two adapters (`ray_backend`
calls it from the driver; it writes through `tracking.Tracker`). A search's trials, and the retrains
of one configuration under other seeds (an ensemble's members, `evaluate --seeds`), recorded alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tune_cells.logged_runs import STOPPED_BY_TIME_BUDGET, LoggedTrial
from tune_cells.promotion_rank import OFFERED_FOR_PROMOTION, PROMOTION_SCORE, offered

if TYPE_CHECKING:
    from tune_cells.data.splits import DatasetRecord
    from tune_cells.tracking import Tracker

log = logging.getLogger(__name__)
RETRAIN = "retrain"  # the run type of a fixed configuration trained again under another seed
ENSEMBLE_MEMBER, SEEDS_EVALUATION = "ensemble_member", "seeds_evaluation"  # why it was (RETRAIN_PURPOSE_TAG)


@dataclass
class TrialRecorder:
    """Ray trial events → one nested MLflow child run per trial (TrialEvents protocol), under the
    search's run; with `run_type` retrain, one per retrain (`recording_retrains`)."""

    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    max_epochs: int
    metric_keys: tuple[str, ...]

    common_tags: dict = field(default_factory=dict)  # set on every trial run (e.g. the split's hash)
    summary_keys: tuple[str, ...] = ("val_loss", "val_balanced_accuracy")
    source: str | None = None  # the command, each trial run's source in the MLflow UI
    dataset: DatasetRecord | None = None  # the split the trials train and validate on (an MLflow dataset input)
    run_type: str = "trial"  # or RETRAIN
    config_tags: tuple[str, ...] = ()  # configuration keys also set as tags (a retrain is told apart by its seed)
    run_name_prefix: str = ""  # runs named <prefix>-<key><value> by config_tags, not by Ray's trial name

    def __post_init__(self):
        self.runs: dict[str, str] = {}  # Ray trial id → MLflow run id
        self._nodes: dict[str, str] = {}  # Ray trial id → the node its run is tagged with
        self.ended = 0

    def on_trial_start(self, trial_id: str, trial_name: str, config: dict) -> None:
        if trial_id in self.runs:  # a retried or resumed trial continues its own run
            if self.tracker.get_run(self.runs[trial_id]).info.status != "RUNNING":
                self.tracker.reopen_run(self.runs[trial_id])
            return
        by_config = {key: config[key] for key in self.config_tags if key in config}
        if self.run_name_prefix:
            trial_name = "-".join([self.run_name_prefix, *(f"{k}{v}" for k, v in by_config.items())])
        run_id = self.tracker.start_run(
            self.experiment_id, trial_name, self.run_type, self.parent_run_id,
            tags={**self.common_tags, "ray_trial_id": trial_id, **by_config}, source=self.source,
        )
        self.tracker.log_params(run_id, config)
        if self.dataset is not None:
            self.tracker.log_dataset(run_id, self.dataset, "training")
        self.runs[trial_id] = run_id

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        metrics = {k: result[k] for k in self.metric_keys if k in result}
        if PROMOTION_SCORE in result:  # the report reads which epochs competed for promotion
            metrics[OFFERED_FOR_PROMOTION] = float(offered(result))
        self.tracker.log_metrics(run_id, metrics, step=int(result.get("training_iteration", 0)))
        node = result.get("node_id")
        if node and self._nodes.get(trial_id) != node:  # once per node, not a store write every epoch
            self.tracker.set_tags(run_id, {"ray_node_id": node})
            self._nodes[trial_id] = node

    def on_trial_end(self, trial_id: str, failed: bool, last_result: dict, error: str | None) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        epochs = int(last_result.get("training_iteration", 0))
        if last_result.get("failure"):  # ended by the trainable itself (a diverged loss): not retried
            failed, error = True, str(last_result["failure"])
        tags = {"epochs_run": epochs}
        if failed:
            tags["failure"] = error or "trial failed"
        elif epochs < self.max_epochs and last_result.get(STOPPED_BY_TIME_BUDGET):
            tags[STOPPED_BY_TIME_BUDGET] = "true"
        elif epochs < self.max_epochs:
            tags["stopped_early"] = "true"  # the trainable always runs to max_epochs unless ASHA stops it
        self.tracker.set_tags(run_id, tags)
        self.tracker.end_run(run_id, "FAILED" if failed else "FINISHED")
        self.ended += 1
        if failed:
            log.warning("%s %s failed after %d epochs: %s", self.run_type, trial_id, epochs, tags["failure"])
        else:
            log.info("%s %s done (%d finished): %d epochs%s, last %s", self.run_type, trial_id, self.ended, epochs,
                     " (stopped early by ASHA)" if "stopped_early" in tags else
                     " (stopped by the time budget)" if STOPPED_BY_TIME_BUDGET in tags else "",
                     ", ".join(f"{k} {last_result[k]:.4f}" for k in self.summary_keys if k in last_result))

    def end_unfinished(self, reason: str) -> None:
        """Its runs still RUNNING end KILLED, tagged `reason` (Tune stopped by Ctrl-C or SIGTERM
        reports no end for the trials it stops)."""
        for run_id in self.runs.values():
            if self.tracker.get_run(run_id).info.status == "RUNNING":
                self.tracker.set_tags(run_id, {"failure": reason})
                self.tracker.end_run(run_id, "KILLED")


@contextmanager
def recording_retrains(trials: TrialRecorder, purpose: str, retrains_of: dict,
                       supersede_earlier: bool = False) -> Iterator[TrialRecorder]:
    """A recorder for retrains of one configuration, recorded as `trials` records a search's trials
    (its experiment, parent run, tags, metrics and dataset: MLflow records every training), as
    runs of type RETRAIN tagged with `purpose`, their seed and `retrains_of` (what they retrain).

    `supersede_earlier`: earlier retrain runs of `purpose` under the parent are an attempt whose
    retrains are being redone (a promotion killed before its ensemble was whole): they are
    soft-deleted, so each member keeps one run. Interrupted, its unfinished runs end KILLED."""
    from tune_cells.tracking import RETRAIN_PURPOSE_TAG  # (here: the module imports no MLflow)

    tracker = trials.tracker
    if supersede_earlier:
        for earlier in tracker.retrain_children(trials.experiment_id, trials.parent_run_id, purpose):
            tracker.supersede_run(earlier.info.run_id, "retrained again by a resumed promotion")
    recorder = replace(trials, run_type=RETRAIN, config_tags=("seed",), run_name_prefix=purpose.replace("_", "-"),
                       common_tags={**trials.common_tags, RETRAIN_PURPOSE_TAG: purpose, **retrains_of})
    try:
        yield recorder
    except BaseException as exc:
        recorder.end_unfinished(f"the retraining stopped before this retrain finished ({type(exc).__name__})")
        raise


def retrain_runs_by_seed(runs) -> dict[int, str]:
    """Seed → run id of retrain runs (MLflow runs; a later run of a seed wins)."""
    trials = [LoggedTrial.of(run) for run in runs]
    return {trial.seed: trial.run_id for trial in trials if trial.seed is not None}


@dataclass
class EventSinks:
    """Several TrialEvents sinks, each event to each in order (the MLflow recorder first: the live
    view reads the run ids it makes)."""

    sinks: list

    def on_trial_start(self, trial_id: str, trial_name: str, config: dict) -> None:
        for sink in self.sinks:
            sink.on_trial_start(trial_id, trial_name, config)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        for sink in self.sinks:
            sink.on_trial_result(trial_id, result)

    def on_trial_end(self, trial_id: str, failed: bool, last_result: dict, error: str | None) -> None:
        for sink in self.sinks:
            sink.on_trial_end(trial_id, failed, last_result, error)


def budget_reached_before(result, tracker, experiment_id: str, parent: str):
    """A search resumed after its budget ran out (interrupted in promotion, or refused by
    --max-latency-ms): Ray's saved state ends every trial, so the budget's bookkeeping, which lived
    in the interrupted process, is read back from the trial runs' tags: the trials it stopped, and
    no trial for those it never started (0 epochs, no run)."""
    runs = {logged.ray_trial_id: logged for logged in map(LoggedTrial.of, tracker.trial_children(experiment_id, parent))}
    stopped = [t.trial_id for t in result.trials if t.trial_id in runs and runs[t.trial_id].stopped_by_time_budget]
    # (also where the budget ran out between trials and stopped none: the ones it never started)
    started = [t for t in result.trials if t.failed or t.iterations or t.trial_id in runs]
    return replace(result, trials=started, stopped_by_time_budget=stopped)
