"""One search, start to finish: preflight, split, search, promote (evaluation follows in a new process).

The preflight checks everything cheap to check and writes nothing; only when it passes are the
split file, the read log, the MLflow store and the Ray results folder touched. So a bad input
leaves the user's store and working folder exactly as they were.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from tune_cells.data.images import ImageIndex, ImageScan, full_array, mask_array, scan_images, store_array
from tune_cells.data.reader import SplitReader
from tune_cells.data.splits import Split, cross_split_duplicates, plan_split, save_split, split_path
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
    cpus_per_trial: float | None = None  # None: 1
    gpus_per_trial: float | None = None  # None: per model (models.GPU_SHARE) where there are GPUs, else 0
    seed: int = 0
    experiment: str | None = None
    workdir: Path = Path("tune-cells-runs")
    tracking_uri: str | None = None
    storage: str | None = None
    space: Path | None = None
    address: str | None = None
    max_concurrent: int | None = None
    verbose: bool = False
    resume: bool = False  # continue the latest interrupted search of the experiment


@dataclass
class PreparedSearch:
    """Everything the preflight established; nothing of it is written yet."""

    task: TaskSpec
    space: SearchSpace
    workdir: Path
    index: ImageIndex
    split: Split
    experiment: str
    model_name: str
    tracking_uri: str
    # Filled by the slow part of the preflight (`check_pixels`):
    duplicates: list[dict] = field(default_factory=list)  # near-identical images across split parts
    decoded: dict = field(default_factory=dict)  # train/val pixels by path
    resume_run_id: str = ""  # with --resume: the interrupted search's parent run ...
    resume_name: str = ""  # ... and its Ray experiment name


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
    best_config_file: Path


# --- preflight: checks only, no writes (except generated demo data) ------------------------


def check_options(opts: SearchOptions) -> None:
    positive = {"--samples": opts.samples, "--max-epochs": opts.max_epochs, "--grace-period": opts.grace_period}
    for flag, value in positive.items():
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    if opts.reduction_factor < 2:
        raise UserInputError(f"--reduction-factor {opts.reduction_factor}: must be at least 2")
    if opts.cpus_per_trial is not None and opts.cpus_per_trial <= 0:
        raise UserInputError(f"--cpus-per-trial {opts.cpus_per_trial:g}: must be above 0")
    if opts.gpus_per_trial is not None and opts.gpus_per_trial < 0:
        raise UserInputError(f"--gpus-per-trial {opts.gpus_per_trial:g}: must not be negative")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent {opts.max_concurrent}: must be at least 1")


def check_local_resources(opts: SearchOptions) -> None:
    """A trial that asks for more than this machine has would wait forever on a local Ray: said
    before anything is written (and again against what Ray itself detects, once it runs)."""
    if opts.address:  # a cluster may still grow
        return
    gpus = 0
    if opts.gpus_per_trial:
        import torch

        gpus = torch.cuda.device_count()
    _check_trial_fits(opts, os.cpu_count() or 1, gpus)


def _check_trial_fits(opts: SearchOptions, cpus: float, gpus: float) -> None:
    if (opts.gpus_per_trial or 0) > gpus:
        raise UserInputError(f"--gpus-per-trial {opts.gpus_per_trial:g}: this machine has {gpus:g} GPUs")
    if (opts.cpus_per_trial or 0) > cpus:
        raise UserInputError(f"--cpus-per-trial {opts.cpus_per_trial:g}: this machine has {cpus:g} CPUs")


MIN_FREE_BYTES = 1 << 30  # checkpoints, Ray results and the MLflow store of a small search


def check_workdir(workdir: Path, min_free: int = 0) -> Path:
    """The absolute workdir, if it exists or can be created, is writable and has `min_free` bytes
    free (nothing is created)."""
    workdir = Path(workdir).expanduser().resolve()
    probe = workdir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--workdir {workdir}: not writable ({probe} is not a writable folder)")
    free = shutil.disk_usage(probe).free
    if free < min_free:
        raise UserInputError(f"--workdir {workdir}: only {free / 2**30:.2f} GiB free, a search needs at least "
                             f"{min_free / 2**30:.0f} GiB")
    return workdir


def prepare_workdir(workdir: Path) -> Path:
    workdir = check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def check_tracking(uri: str) -> None:
    """A server must answer; a sqlite file must be creatable. Nothing is created here."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                response.read()
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            raise UserInputError(f"tracking server {uri} does not answer ({reason})") from None
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        check_workdir(db.parent)


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

    from tune_cells.models import (expected_weights_file, has_pretrained_weights, pretrained_arch,
                                   pretrained_available)
    from tune_cells.models import UNET_ENCODERS
    from tune_cells.segmentation import LOSSES
    from tune_cells.training import LR_SCHEDULES, OPTIMIZERS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(32):
        trial = study.ask()
        configs.append(space.sample(trial))
        study.tell(trial, 0.0)
    for config in configs + [{"model": "small_convnet", "lr": 0, **p} for p in space.initial_points]:
        for required in ("model", "lr"):
            if required not in config:
                raise UserInputError(f"{space.source}: the space sets no `{required}`")
        # The training code would otherwise fall back silently (AdamW, constant LR) on a typo.
        for key, known in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("loss", LOSSES),
                           ("encoder", UNET_ENCODERS)):
            if key in config and config[key] not in known:
                raise UserInputError(f"{space.source}: unknown {key} {config[key]!r}; known: {', '.join(known)}")
        model = config["model"]
        if model not in model_names():
            raise UserInputError(f"{space.source}: unknown model {model!r}; known: {', '.join(model_names())}")
        if config.get("pretrained"):
            arch = pretrained_arch(config)
            if not has_pretrained_weights(arch):
                raise UserInputError(f"{space.source}: {arch} has no pretrained weights")
            if not pretrained_available(arch):
                raise UserInputError(
                    f"{space.source}: pretrained {arch} needs {expected_weights_file(arch)}: download it on a "
                    "machine with internet, or set TORCH_HOME to a cache that has it")


def prepare(opts: SearchOptions) -> PreparedSearch:
    """The whole preflight: the quick checks, then every image decoded (see `check_pixels`)."""
    prep = check_inputs(opts)
    check_pixels(prep)
    return prep


def check_inputs(opts: SearchOptions) -> PreparedSearch:
    """The quick part of the preflight: options, space, workdir, dataset index, split, store."""
    from tune_cells.tracking import resolve_tracking_uri

    task = get_task(opts.task)
    check_options(opts)
    check_local_resources(opts)
    space = load_space(opts.space or builtin_space_path(task.default_space))
    check_space(space, opts.seed)
    workdir = check_workdir(opts.workdir, MIN_FREE_BYTES)
    index = load_dataset(task, opts.data, workdir)
    split = plan_split(split_path(workdir, task.name, index, opts.seed), index, opts.seed)
    tracking_uri = resolve_tracking_uri(opts.tracking_uri, workdir)
    check_tracking(tracking_uri)
    suffix = "-demo" if index.source == "demo" else ""
    prep = PreparedSearch(task, space, workdir, index, split, opts.experiment or f"tune-cells-{task.name}{suffix}",
                          f"tune-cells-{task.name}{suffix}", tracking_uri)
    if opts.resume:
        prep.resume_run_id, prep.resume_name = find_interrupted_search(opts, prep)
    return prep


def check_pixels(prep: PreparedSearch) -> None:
    """The slow part of the preflight: every image decodes (their pixels for training are kept),
    and near-identical images across split parts are found."""
    scan, prep.decoded = decode_once(prep.task, prep.index, prep.split)
    prep.duplicates = cross_split_duplicates(prep.split, list(prep.index.items["path"]), scan.hashes)


def decode_once(task: TaskSpec, index: ImageIndex, split: Split) -> tuple[ImageScan, dict]:
    """Check that every image (and mask) decodes, hash it for the duplicate check, and keep the
    train and validation pixels in the form training uses: the one decoding pass of a search.
    Test pixels are never kept: the test part is read only after promotion."""
    from functools import partial

    fitting = frozenset(split.parts["train"]) | frozenset(split.parts["val"])
    if index.kind != "segmentation":
        scan = scan_images(index.root, list(index.items["path"]), fitting,
                           partial(store_array, channels=task.channels, size=task.store_size))
        return scan, scan.kept
    scan = scan_images(index.root, list(index.items["path"]), fitting, full_array)
    decoded = dict(scan.kept)
    fitting_rows = index.items["path"].isin(fitting)
    for target in index.classes:
        masks = index.items[f"mask:{target}"]
        decoded.update(scan_images(index.root, list(masks), frozenset(masks[fitting_rows]), mask_array).kept)
    return scan, decoded


RESUME_MUST_MATCH = ("samples", "max_epochs", "grace_period", "reduction_factor", "seed")


def find_interrupted_search(opts: SearchOptions, prep: PreparedSearch) -> tuple[str, str]:
    """(parent run id, Ray experiment name) of the latest search of the experiment, which must be
    unfinished, resumable from its Ray state, and started with the same data and budget flags."""
    from tune_cells import ray_backend
    from tune_cells.tracking import Tracker

    tracker = Tracker(prep.tracking_uri, prep.workdir / "mlartifacts")
    if not tracker.store_exists():
        raise UserInputError(f"--resume: no MLflow store at {prep.tracking_uri}, so no search to resume")
    latest = tracker.latest_search(prep.experiment)
    if latest is None:
        raise UserInputError(f"--resume: experiment {prep.experiment} has no search to resume")
    name = latest.data.tags.get("ray_experiment", "")
    if latest.info.status == "FINISHED":
        raise UserInputError(f"--resume: the latest search of {prep.experiment} ({name}) finished; nothing to resume")
    storage = opts.storage or str(prep.workdir / "ray" / prep.experiment)
    if not name or not ray_backend.can_resume(storage, name):
        raise UserInputError(f"--resume: no Ray state for {name or 'the latest search'} under {storage}")
    current = prep.split.sha256 if prep.split.path.exists() else ""
    if latest.data.tags.get("split_sha256") != current:
        raise UserInputError(f"--resume: search {name} used another split or dataset than --data gives now")
    for key in RESUME_MUST_MATCH:
        given, started = str(getattr(opts, key)), latest.data.params.get(key)
        if started is not None and given != started:
            raise UserInputError(f"--resume: search {name} was started with --{key.replace('_', '-')} {started}, "
                                 f"not {given}")
    return latest.info.run_id, name


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for, by its configuration (picklable: Ray stores it)."""

    cpus: float
    gpus: float | None  # None: the model's default share of a GPU (models.GPU_SHARE)
    use_gpus: bool

    def __call__(self, config: dict) -> dict[str, float]:
        from tune_cells.models import gpu_share

        gpus = self.gpus if self.gpus is not None else gpu_share(config.get("model", "")) if self.use_gpus else 0.0
        return {"CPU": self.cpus, "GPU": gpus} if gpus else {"CPU": self.cpus}


def trial_resources(opts: SearchOptions, cluster: dict) -> TrialResources:
    """Explicit flags win; otherwise GPUs are used where the cluster has them, shared per model.

    On a local Ray an impossible request is bad input; on a cluster (--address) the autoscaler
    may still add nodes, so it is only explained while trials wait.
    """
    gpus = cluster.get("GPU", 0)
    if not opts.address:
        _check_trial_fits(opts, cluster.get("CPU", 0), gpus)
    return TrialResources(opts.cpus_per_trial or 1.0, opts.gpus_per_trial, use_gpus=gpus > 0)


# --- the search ---------------------------------------------------------------------------


def run_search(opts: SearchOptions) -> SearchOutcome:
    from tune_cells import ray_backend

    started = time.time()
    prep = check_inputs(opts)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Ray's start mostly waits for its processes. Meanwhile: decode every image (Pillow works
        # without the GIL) and then open the MLflow store (a fresh one spends seconds on its
        # schema). A bad image still stops the search before the workdir or the store is touched.
        store = pool.submit(_check_pixels_and_open_store, prep)
        try:
            resources = ray_backend.init(opts.address, num_cpus=os.cpu_count(), verbose=opts.verbose,
                                         object_store_bytes=None if opts.address else _object_store_bytes(prep))
            tracker, experiment_id = store.result()
            outcome = _tracked_search(opts, prep, trial_resources(opts, resources), tracker, experiment_id)
        finally:
            ray_backend.shutdown()
    outcome.wall_time_s = time.time() - started
    return outcome


def _check_pixels_and_open_store(prep: PreparedSearch):
    """The slow preflight, then (only if it passed) the workdir, the store and the experiment."""
    from tune_cells.tracking import Tracker

    check_pixels(prep)
    prepare_workdir(prep.workdir)
    tracker = Tracker(prep.tracking_uri, prep.workdir / "mlartifacts")
    return tracker, tracker.experiment_id(prep.experiment)


def _object_store_bytes(prep: PreparedSearch) -> int:
    images = len(prep.split.parts["train"]) + len(prep.split.parts["val"])
    if prep.index.kind == "segmentation":  # full-size images and masks (sizes from the first header)
        from PIL import Image

        with Image.open(prep.index.root / prep.split.parts["train"][0]) as first:
            per_image = first.width * first.height * (3 + len(prep.index.classes))
    else:
        per_image = prep.task.store_size ** 2 * prep.task.channels
    return max(128 << 20, 3 * images * per_image)


def _tracked_search(opts: SearchOptions, prep: PreparedSearch, resources: TrialResources, tracker,
                    experiment_id: str) -> SearchOutcome:
    from tune_cells import ray_backend
    from tune_cells.tracking import TrialRecorder

    split = save_split(prep.split)
    reader = SplitReader(prep.index, split, prep.task.channels, prep.task.store_size, prep.workdir, prep.decoded)
    what = prep.index.class_counts() if prep.index.kind == "classification" else f"targets {prep.index.classes}"
    log.info("dataset %s: %d images, %s; split %s", prep.index.root, len(prep.index.items), what, split.sizes())
    trial = trial_inputs(prep.task, prep.index, reader, opts.max_epochs, opts.seed)
    data = trial.data

    if prep.duplicates:
        first = prep.duplicates[0]
        log.warning("%d near-identical image pairs across split parts (e.g. %s in %s ~ %s in %s): held-out "
                    "metrics may be optimistic; edit %s to move them into one part", len(prep.duplicates),
                    first["path_a"], first["part_a"], first["path_b"], first["part_b"], split.path)
    storage = opts.storage or str(prep.workdir / "ray" / prep.experiment)
    if opts.resume:
        parent, search_name = prep.resume_run_id, prep.resume_name
        tracker.reopen_run(parent)
        log.info("resuming search %s (%s)", search_name, parent)
    else:
        search_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        parent = tracker.start_run(experiment_id, search_name, "search", tags={
            "task": prep.task.name, "data_root": str(prep.index.root), "data_source": prep.index.source,
            "split_file": split.path.name, "split_sha256": split.sha256, "ray_experiment": search_name,
        })
    try:
        if not opts.resume:
            _log_search_inputs(tracker, parent, opts, prep, split, data, resources)
        recorder = TrialRecorder(tracker, experiment_id, parent, opts.max_epochs, trial.metric_keys,
                                 common_tags={"split_sha256": split.sha256}, summary_keys=trial.summary_keys)
        if opts.resume:  # the trial → run map lives in MLflow (each child run is tagged with its trial id)
            recorder.runs.update(tracker.trial_runs(experiment_id, parent))
        result = ray_backend.run_search(ray_backend.SearchRequest(
            trainable=trial.trainable, trainable_kwargs={"data": data}, space=prep.space,
            metric=prep.task.metric, mode=prep.task.mode, samples=opts.samples, seed=opts.seed,
            max_epochs=opts.max_epochs, grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
            trial_resources=resources, name=search_name, events=recorder,
            storage_path=storage, initial_points=prep.space.initial_points, max_concurrent=opts.max_concurrent,
            resume=opts.resume,
        ))
        tracker.end_orphaned_trial_runs(experiment_id, parent, {t.trial_id: t.failed for t in result.trials})
        return _promote(tracker, parent, opts, prep, split, result, recorder.runs)
    except BaseException as exc:
        tracker.set_tags(parent, {"failure": f"{type(exc).__name__}: {exc}"[:500]})
        tracker.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


@dataclass
class TrialInputs:
    trainable: object  # the Ray Tune function trainable
    data: object  # its decoded train/val data, shared with every trial through the object store
    metric_keys: tuple[str, ...]  # what each epoch reports, logged to the trial's MLflow run
    summary_keys: tuple[str, ...]


def trial_inputs(task: TaskSpec, index: ImageIndex, reader: SplitReader, max_epochs: int, seed: int) -> TrialInputs:
    """Decode the train and validation parts once, for the task's kind of trainable."""
    from tune_cells.transforms import channel_stats

    classes = list(index.classes)
    if task.kind == "segmentation":
        from tune_cells.segmentation import pixel_stats
        from tune_cells.trainables.segmentation import SegmentationData, metric_keys, train_segmenter

        train_images, train_masks = reader.load_segmentation("train", "training")
        val_images, val_masks = reader.load_segmentation("val", "selection")
        mean, std = pixel_stats(train_images)
        data = SegmentationData(train_images, train_masks, val_images, val_masks, task.name, classes, mean, std,
                                max_epochs, seed)
        return TrialInputs(train_segmenter, data, metric_keys(classes), ("val_loss", "val_dice"))
    from tune_cells.trainables.classification import METRICS, ClassificationData, train_classifier

    train_images, train_labels = reader.load("train", "training")
    val_images, val_labels = reader.load("val", "selection")
    mean, std = channel_stats(train_images)
    data = ClassificationData(train_images, train_labels, val_images, val_labels, task.name, classes, task.channels,
                              task.store_size, mean, std, max_epochs, seed)
    return TrialInputs(train_classifier, data, METRICS, ("val_loss", "val_balanced_accuracy"))


def _log_search_inputs(tracker, parent: str, opts: SearchOptions, prep: PreparedSearch, split: Split, data,
                       resources: TrialResources) -> None:
    task = prep.task
    tracker.log_params(parent, {
        **{k: _without_credentials(v) for k, v in asdict(opts).items()
           if k not in ("data", "workdir", "space", "task", "verbose")},
        "trial_cpus": resources.cpus, "trial_gpus": "per model" if resources.gpus is None and resources.use_gpus
        else resources.gpus or 0,
        "task": task.name, "data": str(prep.index.root), "space": prep.space.source, "workdir": str(prep.workdir),
        "metric": task.metric, "mode": task.mode, "split_sha256": split.sha256,
        "classes": ",".join(prep.index.classes), "images": len(prep.index.items),
        **{f"split_{part}": n for part, n in split.sizes().items()},
        "near_duplicates_across_splits": len(prep.duplicates),
        # (Listing the cache imports torchvision: seconds a space without pretrained models need not wait.)
        "pretrained_weights_cached": (_cached_pretrained_weights() or "none") if prep.space.may_use_pretrained
        else "not used by the space",
        "promotion_policy": f"best trial by {task.mode} {task.metric} over all its epochs; its best-epoch checkpoint",
    })
    labels = dict(zip(prep.index.items["path"], prep.index.items["label"]))
    if prep.index.kind == "segmentation":
        counts = {part: {"images": len(paths)} for part, paths in split.parts.items()}
    else:
        counts = {part: {name: sum(labels[p] == i for p in paths) for i, name in enumerate(prep.index.classes)}
                  for part, paths in split.parts.items()}
    summary = {
        "root": str(prep.index.root), "source": prep.index.source, "kind": prep.index.kind,
        "classes": prep.index.classes, "counts": counts,
        "train_channel_mean": data.mean, "train_channel_std": data.std,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data_summary.json").write_text(json.dumps(summary, indent=1))
        (Path(tmp) / "search_space.yaml").write_text(prep.space.to_yaml())
        tracker.log_artifact(parent, Path(tmp) / "data_summary.json")
        if prep.duplicates:
            pd.DataFrame(prep.duplicates).to_csv(Path(tmp) / "near_duplicates.csv", index=False)
            tracker.log_artifact(parent, Path(tmp) / "near_duplicates.csv")
        tracker.log_artifact(parent, Path(tmp) / "search_space.yaml")
    tracker.log_artifact(parent, split.path, "split")


def _without_credentials(value):
    """A URI with its password replaced (`https://user:secret@host` → `https://user:***@host`):
    parameters are visible to everyone who can read the store."""
    if not isinstance(value, str) or "@" not in value or "://" not in value:
        return value
    parsed = urlparse(value)
    if parsed.password is None:
        return value
    return value.replace(f":{parsed.password}@", ":***@", 1)


def _cached_pretrained_weights() -> str:
    """Which ImageNet backbones this machine's torch cache can load (logged with every search)."""
    from tune_cells.models import pretrained_available, pretrained_architectures

    return ",".join(arch for arch in pretrained_architectures() if pretrained_available(arch))


def _promote(tracker, parent: str, opts: SearchOptions, prep: PreparedSearch, split: Split, result,
             trial_runs: dict[str, str]) -> SearchOutcome:
    task = prep.task
    best_run = trial_runs.get(result.best_trial_id, "")
    version = tracker.log_model(best_run or parent, result.best_checkpoint, prep.model_name, tags={
        "task": task.name, "search_run_id": parent, "trial_run_id": best_run, "ray_trial_id": result.best_trial_id,
        "epoch": result.best_epoch, task.metric: f"{result.best_metric:.6f}", "data_root": str(prep.index.root),
        "split_file": str(split.path), "split_seed": split.seed, "split_sha256": split.sha256,
    }, classes=list(prep.index.classes), kind=prep.index.kind)
    previous = tracker.promote(prep.model_name, version)
    shutil.rmtree(result.best_checkpoint, ignore_errors=True)
    failed = sum(t.failed for t in result.trials)
    stopped = sum(1 for t in result.trials if not t.failed and t.iterations < opts.max_epochs)
    tracker.log_metrics(parent, {f"best_{task.metric}": result.best_metric, "trials_failed": failed,
                                 "trials_stopped_early": stopped, "trials": len(result.trials),
                                 "searcher_trials": result.searcher_trials})
    tracker.set_tags(parent, {"best_trial_id": result.best_trial_id, "best_trial_run_id": best_run,
                              "model_name": prep.model_name, "model_version": version,
                              "previous_champion": previous or "", "ray_experiment_path": result.experiment_path})
    best_config_file = _export_best_config(prep, parent, result)
    tracker.log_artifact(parent, best_config_file)
    tracker.end_run(parent)
    return SearchOutcome(
        task=task.name, workdir=prep.workdir, metric=task.metric, experiment=prep.experiment, parent_run_id=parent,
        model_name=prep.model_name, model_version=version, best_trial_id=result.best_trial_id,
        best_metric=result.best_metric, best_epoch=result.best_epoch, best_config=result.best_config,
        trials=len(result.trials), failed_trials=failed, stopped_early=stopped, wall_time_s=0.0,
        tracking_uri=tracker.tracking_uri, best_config_file=best_config_file,
    )


def _export_best_config(prep: PreparedSearch, parent: str, result) -> Path:
    """The champion's configuration as a pinned space (every parameter fixed): `--space` reruns it."""
    import yaml

    path = prep.workdir / "best-configs" / prep.experiment / f"{parent}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    description = (f"Pinned best configuration of search run {parent} ({prep.experiment}): trial "
                   f"{result.best_trial_id}, {prep.task.metric} {result.best_metric:.4f} at epoch {result.best_epoch}.")
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in sorted(result.best_config.items())}
    path.write_text(yaml.safe_dump({"description": description, "params": params}, sort_keys=False))
    return path


def evaluate_in_fresh_process(outcome: SearchOutcome) -> int:
    """Evaluate the promoted version in a new interpreter: it must stand on what the registry holds."""
    command = [sys.executable, "-m", "tune_cells", "evaluate", outcome.task,
               "--model-uri", f"models:/{outcome.model_name}/{outcome.model_version}",
               "--workdir", str(outcome.workdir), "--tracking-uri", outcome.tracking_uri]
    return subprocess.call(command)
