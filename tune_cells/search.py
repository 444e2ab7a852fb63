"""One search, start to finish: check inputs, split, search, promote, evaluate.

Everything that can be checked cheaply is checked before the MLflow store or Ray is touched,
so a bad input leaves the user's store and working folder as they were.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tune_cells.data.images import ImageIndex, check_decodable
from tune_cells.data.reader import SplitReader
from tune_cells.data.splits import Split, load_or_create_split, split_path
from tune_cells.errors import UserInputError
from tune_cells.models import model_names
from tune_cells.search_spaces import SearchSpace, builtin_space_path, load_space
from tune_cells.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    task: str
    data: Path | None = None
    samples: int = 8
    max_epochs: int = 10
    grace_period: int = 2
    reduction_factor: int = 3
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int = 0
    experiment: str | None = None
    workdir: Path = Path("tune-cells-runs")
    tracking_uri: str | None = None
    storage: str | None = None
    space: Path | None = None
    address: str | None = None
    max_concurrent: int | None = None
    verbose: bool = False


@dataclass
class SearchOutcome:
    task: str
    workdir: Path
    metric: str
    experiment: str
    parent_run_id: str
    model_name: str
    model_version: str
    best_trial_id: str
    best_metric: float
    best_epoch: int
    best_config: dict
    trials: int
    failed_trials: int
    stopped_early: int
    wall_time_s: float
    tracking_uri: str


def check_options(opts: SearchOptions) -> None:
    positive = {"--samples": opts.samples, "--max-epochs": opts.max_epochs, "--grace-period": opts.grace_period}
    for flag, value in positive.items():
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    if opts.reduction_factor < 2:
        raise UserInputError(f"--reduction-factor {opts.reduction_factor}: must be at least 2")
    if opts.cpus_per_trial <= 0:
        raise UserInputError(f"--cpus-per-trial {opts.cpus_per_trial}: must be above 0")
    if opts.gpus_per_trial < 0:
        raise UserInputError(f"--gpus-per-trial {opts.gpus_per_trial}: must not be negative")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent {opts.max_concurrent}: must be at least 1")


def prepare_workdir(workdir: Path) -> Path:
    workdir = Path(workdir).expanduser().resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"--workdir {workdir}: not writable ({exc.strerror})") from None
    return workdir


def load_dataset(task: TaskSpec, data: Path | None, workdir: Path) -> ImageIndex:
    if data is not None:
        return task.importer(Path(data))
    if task.demo is None:
        raise UserInputError(f"task {task.name} has no demo data: give --data DIR ({task.layout})")
    index = task.importer(task.demo(workdir / "demo-data" / task.name))
    index.source = "demo"
    return index


def check_space(space: SearchSpace, seed: int) -> None:
    """Sample the space a few times so that typos fail now, not in trial 37."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(16):
        trial = study.ask()
        config = space.sample(trial)
        study.tell(trial, 0.0)
        if "model" not in config:
            raise UserInputError(f"{space.source}: the space sets no `model`")
        if config["model"] not in model_names():
            raise UserInputError(f"{space.source}: unknown model {config['model']!r}; known: {', '.join(model_names())}")
        if "lr" not in config:
            raise UserInputError(f"{space.source}: the space sets no `lr`")
    for point in space.initial_points:
        if point.get("model", "small_convnet") not in model_names():
            raise UserInputError(f"{space.source}: initial point uses unknown model {point['model']!r}")


def names_for(task: TaskSpec, index: ImageIndex, experiment: str | None) -> tuple[str, str]:
    suffix = "-demo" if index.source == "demo" else ""
    return experiment or f"tune-cells-{task.name}{suffix}", f"tune-cells-{task.name}{suffix}"


def run_search(opts: SearchOptions) -> SearchOutcome:
    from tune_cells import ray_backend
    from tune_cells.tracking import TrialRecorder, Tracker, resolve_tracking_uri
    from tune_cells.trainables.classification import METRICS, ClassificationData, train_classifier
    from tune_cells.transforms import channel_stats

    started = time.time()
    task = get_task(opts.task)
    check_options(opts)
    space = load_space(opts.space or builtin_space_path(task.default_space))
    check_space(space, opts.seed)
    workdir = prepare_workdir(opts.workdir)
    index = load_dataset(task, opts.data, workdir)
    split = load_or_create_split(split_path(workdir, task.name, index, opts.seed), index, opts.seed)
    reader = SplitReader(index, split, task.channels, task.store_size, workdir)
    log.info("dataset %s: %d images, %s; split %s", index.root, len(index.items), index.class_counts(), split.sizes())
    train_images, train_labels = reader.load("train", "training")
    val_images, val_labels = reader.load("val", "selection")
    check_decodable(index.root, split.parts["test"], task.channels)  # pixels not kept: not a read
    mean, std = channel_stats(train_images)

    experiment, model_name = names_for(task, index, opts.experiment)
    tracking_uri = resolve_tracking_uri(opts.tracking_uri, workdir)
    tracker = Tracker(tracking_uri, workdir / "mlartifacts")
    data_bytes = train_images.nbytes + val_images.nbytes
    resources = ray_backend.init(opts.address, num_cpus=os.cpu_count(), object_store_bytes=max(128 << 20, 3 * data_bytes)
                                 if not opts.address else None, verbose=opts.verbose)
    try:
        _check_resources(opts, resources)
        experiment_id = _experiment_id(tracker, experiment)
        search_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        parent = tracker.start_run(experiment_id, search_name, "search", tags={
            "task": task.name, "data_root": str(index.root), "data_source": index.source,
            "split_file": split.path.name, "ray_experiment": search_name,
        })
        try:
            outcome = _search_and_promote(
                opts, task, index, split, space, tracker, experiment_id, experiment, model_name, parent,
                search_name, workdir, ClassificationData(
                    train_images, train_labels, val_images, val_labels, task.name, list(index.classes),
                    task.channels, task.store_size, mean, std, opts.max_epochs, opts.seed,
                    opts.cpus_per_trial, opts.gpus_per_trial),
                train_classifier, METRICS, ray_backend, TrialRecorder,
            )
        except BaseException as exc:
            tracker.set_tags(parent, {"failure": f"{type(exc).__name__}: {exc}"[:500]})
            tracker.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        ray_backend.shutdown()
    outcome.wall_time_s = time.time() - started
    return outcome


def _experiment_id(tracker, experiment: str) -> str:
    try:
        return tracker.experiment_id(experiment)
    except Exception as exc:  # unreachable server, unwritable store, bad URI
        raise UserInputError(f"tracking store {tracker.tracking_uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


def _check_resources(opts: SearchOptions, resources: dict) -> None:
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if opts.gpus_per_trial > gpus:
        raise UserInputError(f"--gpus-per-trial {opts.gpus_per_trial}: the cluster has {gpus:g} GPUs")
    if opts.cpus_per_trial > cpus:
        raise UserInputError(f"--cpus-per-trial {opts.cpus_per_trial}: the cluster has {cpus:g} CPUs")


def _search_and_promote(opts, task, index, split: Split, space, tracker, experiment_id, experiment, model_name,
                        parent, search_name, workdir, data, trainable, metric_keys, ray_backend, recorder_cls):
    tracker.log_params(parent, {
        **{k: v for k, v in asdict(opts).items() if k not in ("data", "workdir", "space", "task")},
        "task": task.name, "data": str(index.root), "space": space.source, "workdir": str(workdir),
        "metric": task.metric, "mode": task.mode, "split_sha256": split.sha256,
        "classes": ",".join(index.classes), "images": len(index.items),
        **{f"split_{part}": n for part, n in split.sizes().items()},
        "promotion_policy": f"best trial by {task.mode} {task.metric} over all its epochs; its best-epoch checkpoint",
    })
    tracker.log_artifact(parent, split.path, "split")
    space_copy = workdir / "splits" / f".space-{search_name}.yaml"
    space_copy.write_text(space.fingerprint())
    tracker.log_artifact(parent, space_copy, "space")
    space_copy.unlink()
    recorder = recorder_cls(tracker, experiment_id, parent, opts.max_epochs, metric_keys)
    storage = opts.storage or str((workdir / "ray" / experiment).resolve())
    request = ray_backend.SearchRequest(
        trainable=trainable, trainable_kwargs={"data": data}, space=space, metric=task.metric, mode=task.mode,
        samples=opts.samples, seed=opts.seed, max_epochs=opts.max_epochs, grace_period=opts.grace_period,
        reduction_factor=opts.reduction_factor, cpus_per_trial=opts.cpus_per_trial,
        gpus_per_trial=opts.gpus_per_trial, storage_path=storage, name=search_name, events=recorder,
        initial_points=space.initial_points, max_concurrent=opts.max_concurrent,
    )
    log.info("search %s: %d trials, up to %d epochs each, ASHA grace %d, reduction %d",
             search_name, opts.samples, opts.max_epochs, opts.grace_period, opts.reduction_factor)
    result = ray_backend.run_search(request)
    best_run = recorder.runs.get(result.best_trial_id)
    version = tracker.log_model(best_run or parent, result.best_checkpoint, model_name, tags={
        "task": task.name, "search_run_id": parent, "trial_run_id": best_run or "", "ray_trial_id": result.best_trial_id,
        "epoch": result.best_epoch, task.metric: f"{result.best_metric:.6f}", "data_root": str(index.root),
        "split_file": str(split.path), "split_seed": split.seed, "split_sha256": split.sha256,
    })
    previous = tracker.promote(model_name, version)
    shutil.rmtree(result.best_checkpoint, ignore_errors=True)
    failed = sum(t.failed for t in result.trials)
    stopped = sum(1 for t in result.trials if not t.failed and t.iterations < opts.max_epochs)
    tracker.log_metrics(parent, {f"best_{task.metric}": result.best_metric, "trials_failed": failed,
                                 "trials_stopped_early": stopped, "trials": len(result.trials)})
    tracker.set_tags(parent, {"best_trial_id": result.best_trial_id, "best_trial_run_id": best_run or "",
                              "model_name": model_name, "model_version": version,
                              "previous_champion": previous or "", "ray_experiment_path": result.experiment_path})
    tracker.end_run(parent)
    return SearchOutcome(
        task=task.name, workdir=workdir, metric=task.metric, experiment=experiment, parent_run_id=parent, model_name=model_name, model_version=version,
        best_trial_id=result.best_trial_id, best_metric=result.best_metric, best_epoch=result.best_epoch,
        best_config=result.best_config, trials=len(result.trials), failed_trials=failed, stopped_early=stopped,
        wall_time_s=0.0, tracking_uri=tracker.tracking_uri,
    )


def evaluate_in_fresh_process(outcome: SearchOutcome) -> int:
    """Evaluate the promoted version in a new interpreter: it must stand on what the registry holds."""
    command = [sys.executable, "-m", "tune_cells", "evaluate", outcome.task,
               "--model-uri", f"models:/{outcome.model_name}/{outcome.model_version}",
               "--workdir", str(outcome.workdir), "--tracking-uri", outcome.tracking_uri]
    return subprocess.call(command)
