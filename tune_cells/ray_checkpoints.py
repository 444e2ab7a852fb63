"""What a search and a retrain share of a Ray Tune run: how a trial is placed and retried, which
checkpoints are kept and each trial's best of them, its result files on disk, and local copies of
checkpoints wherever Ray stored them."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from tune_cells.promotion_rank import PROMOTION_SCORE, checkpoint_rank

MAX_FAILURES = 2  # retries of a trial whose worker died (from its last checkpoint)


def placed_trainable(trainable: Callable[..., None], trainable_kwargs: dict[str, Any],
                     trial_resources: Callable[[dict], dict[str, float]]):
    """The trainable with its data passed once by reference (`with_parameters`) and each trial's
    resources as one bundle, as its configuration asks."""
    return tune.with_resources(tune.with_parameters(trainable, **trainable_kwargs),
                               lambda config: tune.PlacementGroupFactory([trial_resources(config)]))


def kept_checkpoints(num_to_keep: int) -> tune.CheckpointConfig:
    """The best `num_to_keep` checkpoints of a trial by the promotion score (the metric, or below it
    what is not offered for promotion)."""
    return tune.CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=PROMOTION_SCORE,
                                 checkpoint_score_order="max")


def best_kept_checkpoint(checkpoints: list, metric: str, mode: str) -> dict:
    """A trial's best kept checkpoint by PROMOTION_SCORE (NaN never best), as TrialSummary fields;
    {} when none has a finite `metric`."""
    scored = [(c, m) for c, m in checkpoints if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if not scored:
        return {}
    checkpoint, metrics = max(scored, key=lambda pair: checkpoint_rank(pair[1], metric, mode))
    return {"best_checkpoint": checkpoint, "best_metric": float(metrics[metric]),
            "best_epoch": int(metrics.get("training_iteration", 0)), "best_metrics": dict(metrics)}


def result_record_callbacks() -> list:
    """Tune's per-trial result files (result.json, progress.csv): every reported result, on disk."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def copy_checkpoint(checkpoint: tune.Checkpoint, destination: Path) -> Path:
    """A local copy of a checkpoint, wherever Ray stored it (a local folder, s3://, NFS)."""
    destination.mkdir(parents=True, exist_ok=True)
    return Path(checkpoint.to_directory(str(destination)))
