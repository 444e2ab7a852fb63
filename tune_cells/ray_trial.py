"""The trial side of the Ray adapter: what a trainable asks of Ray Tune while it runs (the
`TrialSession` of `trainables/skeleton.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import tune


def report(metrics: dict, checkpoint_dir: Path | None = None) -> None:
    checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def report_failure(message: str, metric_keys) -> None:
    """End a trial as failed *without* raising: a deterministic failure (a diverged loss) must not
    be retried by Ray's FailureConfig. The searcher is told NaN (Optuna records a failed trial)."""
    tune.report({**{key: float("nan") for key in metric_keys}, "failure": message})


@contextmanager
def resumed_checkpoint() -> Iterator[Path | None]:
    """The trial's own last checkpoint when Ray restarts or resumes it, else None."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def trial_info() -> dict:
    """Who and where this trial is: its id, Ray node, and the CPUs and GPU ids it was given."""
    context = tune.get_context()
    resources = context.get_trial_resources().required_resources
    return {
        "trial_id": context.get_trial_id(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "cpus": float(resources.get("CPU", 1)),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }
