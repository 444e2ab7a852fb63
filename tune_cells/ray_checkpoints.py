"""What a search and a retrain both keep of a Ray Tune run: each trial's best kept checkpoint,
its result files on disk, and local copies of checkpoints wherever Ray stored them."""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from tune_cells.promotion_rank import checkpoint_rank


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
