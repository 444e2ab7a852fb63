"""What `tune-cells search` is asked for: its options with their defaults, in one place that the
command line reads its defaults from (light: no heavy import, so `--help` stays fast). The
preflight (`tune_cells.preflight.check_options`) checks them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune_cells.paths import DEFAULT_WORKDIR

# --smoke-test: the tiniest search that still runs every stage (two trials, so ASHA compares them)
SMOKE_TEST = {"samples": 2, "max_epochs": 2, "grace_period": 1}


@dataclass
class SearchOptions:
    task: str
    data: Path | None = None
    samples: int = 8
    max_epochs: int = 10
    grace_period: int = 2
    reduction_factor: int = 3
    cpus_per_trial: float | None = None  # None: 1
    gpus_per_trial: float | None = None  # None: per model (its registry entry) where there are GPUs, else 0
    seed: int = 0
    experiment: str | None = None
    workdir: Path = DEFAULT_WORKDIR
    tracking_uri: str | None = None
    storage: str | None = None
    space: Path | None = None
    address: str | None = None
    max_concurrent: int | None = None
    verbose: bool = False
    resume: bool = False  # continue the latest interrupted search of the experiment
    folds: int = 1  # K > 1: each trial trains K fold models on the pooled train and validation parts
    group_pattern: str | None = None  # regex on relative paths: images with the same match are related
    warm_start: bool = False  # the study starts with the finished trials of earlier searches of the task and space
    max_latency_ms: float | None = None  # promote the best trial whose latency per image is at most this
    max_store_size: int | None = None  # cap on the native decode size [default: the task's max_store_size]
    time_budget: float | None = None  # minutes of trials; then every running trial is stopped (Ray's time budget)
