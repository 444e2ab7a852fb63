"""`evaluate --seeds` on Ray Tune: one fixed configuration retrained under several seeds (beside
`ray_backend`, whose `init` and `shutdown` it shares)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from tune_cells.errors import RetrainFailed
from tune_cells.ray_checkpoints import (
    MAX_FAILURES,
    best_kept_checkpoint,
    copy_checkpoint,
    kept_checkpoints,
    placed_trainable,
    result_record_callbacks,
)
from tune_cells.ray_events import TrialEvents, first_error_line, forwarding_events
from tune_cells.ray_progress import stop_on_signals
from tune_cells.resources import TrialResources

if TYPE_CHECKING:
    from tune_cells.trial_recorder import TrialRecorder


@dataclass
class SeedRun:
    seed: int
    best_metric: float
    best_epoch: int
    checkpoint: Path  # a local copy of its best-epoch checkpoint


@dataclass
class SeedRuns:
    trained: list[SeedRun]  # by seed
    failed: dict[int, str] = field(default_factory=dict)  # seed → why it failed, diverged or kept no checkpoint

    def raise_first_failure(self) -> None:
        if self.failed:
            seed = min(self.failed)
            raise RetrainFailed(seed, self.failed[seed])


def run_seeds(trainable: Callable[..., None], trainable_kwargs: dict[str, Any], config: dict, seeds: list[int],
              metric: str, mode: str, trial_resources: Callable[[dict], dict[str, float]], storage_path: str,
              name: str, into: Path | None = None, events: TrialEvents | None = None,
              on_interrupt: str = "continue it later with --resume") -> SeedRuns:
    """Train one fixed configuration once per seed (a grid over `seed`, no searcher, no early stop)
    and return each run's best epoch by PROMOTION_SCORE (its metric), as the search's promotion picks it,
    copied into `into`/seed<N> (default: the system's temporary folder). Ctrl-C or SIGTERM raises
    Interrupted once Tune has stopped: half-trained runs are never returned as finished. A retrain
    that failed or diverged is returned in `failed`, with why: the others' training is kept.
    `events` gets each retrain's start, epochs and end, as a search's sink gets its trials' (their
    MLflow runs)."""
    runnable = placed_trainable(trainable, trainable_kwargs, trial_resources)
    with forwarding_events(name, events) as forwarding:
        tuner = tune.Tuner(
            runnable,
            param_space={**config, "seed": tune.grid_search(list(seeds))},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                      callbacks=[forwarding, *result_record_callbacks()],
                                      failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                                      checkpoint_config=kept_checkpoints(1)),
        )
        with stop_on_signals(then=on_interrupt):  # a search's retrains resume with it; evaluate's do not
            results = tuner.fit()
    runs = SeedRuns([])
    for result in results:
        seed = int(result.config["seed"])
        # a diverged retrain ends without an error but reports its failure (its earlier epochs' checkpoints
        # would make a half-trained model): failed, as a diverged trial is never promoted
        failure = first_error_line(result.error) or (result.metrics or {}).get("failure")
        best = {} if failure else best_kept_checkpoint(result.best_checkpoints or [], metric, mode)  # as a trial's
        if not best:
            runs.failed[seed] = failure or f"no checkpoint with a finite {metric}"
            continue
        folder = (copy_checkpoint(best["best_checkpoint"], into / f"seed{seed}") if into is not None
                  else Path(best["best_checkpoint"].to_directory()))
        runs.trained.append(SeedRun(seed, best["best_metric"], best["best_epoch"], folder))
    runs.trained.sort(key=lambda r: r.seed)
    return runs


def retrain_resources(resources: TrialResources, retrains: int, address: str | None) -> TrialResources:
    """An ensemble's retrains run side by side after the search, alone on a local machine: each gets
    its share of its CPUs (at least the search's per-trial CPUs). On a cluster, the trials' own."""
    if address or retrains < 1:
        return resources
    share = max(1, int(ray.cluster_resources().get("CPU", 1)) // retrains)  # the local Ray's, as it was started
    return TrialResources(max(resources.cpus, float(share)), resources.gpus, resources.use_gpus)


def member_retrainer(trainable: Callable[..., None], trainable_kwargs: dict[str, Any], metric: str, mode: str,
                     resources: TrialResources, address: str | None, storage_path: str, name: str,
                     trials: TrialRecorder):
    """An ensemble's retrains (analysis.seed_ensemble.Retrain) on the search's Ray, data and storage:
    the configuration under each seed, each member's best epoch by the search's own promotion rule;
    each recorded in MLflow as `trials` (the search's recorder) records a trial."""
    import time

    from tune_cells.trial_recorder import ENSEMBLE_MEMBER, recording_retrains

    def retrain(config: dict, seeds: list[int], into: Path, retrains_of: dict) -> list[tuple[int, Path]]:
        # Called only where no earlier attempt finished the ensemble: any member runs it left are redone.
        with recording_retrains(trials, ENSEMBLE_MEMBER, retrains_of, supersede_earlier=True) as events:
            runs = run_seeds(trainable, trainable_kwargs, config, seeds, metric, mode,
                             retrain_resources(resources, len(seeds), address), storage_path,
                             f"{name}-ensemble-{time.strftime('%Y%m%d-%H%M%S')}", into, events)
        runs.raise_first_failure()  # an ensemble needs every member
        return [(run.seed, run.checkpoint) for run in runs.trained]

    return retrain
