"""What `tune-cells search` is asked for: its options with their defaults, in one place that the
command line reads its defaults from, and their checks (light: no heavy import, so `--help` and a
mistyped option answer at once; the preflight checks them again for callers other than the CLI)."""

from __future__ import annotations

import logging
import math
import reprlib  # a long name quoted in an error is shortened
from dataclasses import dataclass
from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.paths import DEFAULT_WORKDIR

log = logging.getLogger(__name__)
MIN_STORE_SIZE = 16  # --max-store-size below this leaves nothing to learn from
MAX_NAME_BYTES = 255  # of one file or folder name (Linux, macOS): --experiment names folders

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


def check_options(opts: SearchOptions) -> None:
    """Each option alone and against the others; an unknown task first."""
    from tune_cells.tasks import get_task  # (the registry of tasks imports the data layer: not at import time)

    task = get_task(opts.task)
    positive = {"--samples": opts.samples, "--max-epochs": opts.max_epochs, "--grace-period": opts.grace_period}
    for flag, value in positive.items():
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    if not 1 <= opts.folds <= 20:
        raise UserInputError(f"--folds {opts.folds}: must be 1 (one validation part) to 20")
    if opts.reduction_factor < 2:
        raise UserInputError(f"--reduction-factor {opts.reduction_factor}: must be at least 2")
    if opts.cpus_per_trial is not None and not opts.cpus_per_trial > 0:  # (NaN is not above 0 either)
        raise UserInputError(f"--cpus-per-trial {opts.cpus_per_trial:g}: must be above 0")
    if opts.gpus_per_trial is not None and not opts.gpus_per_trial >= 0:
        raise UserInputError(f"--gpus-per-trial {opts.gpus_per_trial:g}: must not be negative")
    if not 0 <= opts.seed < 2**32:  # Optuna's and NumPy's seeds
        raise UserInputError(f"--seed {opts.seed}: must be 0 to {2**32 - 1}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent {opts.max_concurrent}: must be at least 1")
    if opts.max_store_size is not None and task.max_store_size <= 0:
        raise UserInputError(f"--max-store-size: task {opts.task} keeps each image's own size; it has no store size")
    if opts.max_store_size is not None and opts.max_store_size < MIN_STORE_SIZE:
        raise UserInputError(f"--max-store-size {opts.max_store_size}: must be at least {MIN_STORE_SIZE} px")
    if opts.max_latency_ms is not None and not (math.isfinite(opts.max_latency_ms) and opts.max_latency_ms > 0):
        raise UserInputError(f"--max-latency-ms {opts.max_latency_ms:g}: must be a number of milliseconds above 0")
    if opts.time_budget is not None and not (math.isfinite(opts.time_budget) and opts.time_budget > 0):
        raise UserInputError(f"--time-budget {opts.time_budget:g}: must be a number of minutes above 0")
    if opts.experiment is not None:
        check_experiment_name(opts.experiment)
    if opts.grace_period > opts.max_epochs:
        # Clamped here, once, so that what ASHA uses is also what the search run logs.
        log.warning("--grace-period %d is above --max-epochs %d: using %d", opts.grace_period, opts.max_epochs,
                    opts.max_epochs)
        opts.grace_period = opts.max_epochs


def check_experiment_name(name: str) -> None:
    """The name becomes folders under the workdir (Ray results, pinned configurations): it must
    stay one plain folder name there."""
    if not name.strip():
        raise UserInputError("--experiment: must not be empty")
    if name.strip() in (".", "..") or any(bad in name for bad in ("/", "\\", "\0")):  # also refuses absolute
        raise UserInputError(f"--experiment {name!r}: must be a plain name, without '/', '\\' or '..' (it names "
                             "folders in the workdir)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UserInputError(f"--experiment {reprlib.repr(name)}: {len(name.encode())} bytes, at most {MAX_NAME_BYTES} "
                             "(it names folders in the workdir)")
