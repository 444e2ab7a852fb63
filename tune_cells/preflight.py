"""The preflight of a search: everything cheap to check, checked before anything is written.

Only when it passes are the demo data, the split file, the read log, the MLflow store and the Ray results folder
touched, so a bad input leaves the user's store and working folder exactly as they were.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tune_cells.config import PROMOTION_FIELDS
from tune_cells.data.groups import apply_group_pattern
from tune_cells.data.images import ImageIndex, ImageScan
from tune_cells.data.importers import require_dir
from tune_cells.data.resolution import StoreSize, choose_store_size, decoded_bytes
from tune_cells.data.splits import Split, cross_split_duplicates, plan_split
from tune_cells.errors import UserInputError
from tune_cells.kinds import TaskKind, get_kind
from tune_cells.logged_runs import LoggedSearch
from tune_cells.paths import WorkDir
from tune_cells.ray_places import check_ray_address, check_storage, storage_for_ray
from tune_cells.redact import without_credentials
from tune_cells.resources import check_local_resources
from tune_cells.search_options import SearchOptions, check_options  # noqa: F401  (re-exported: callers import them from here)
from tune_cells.search_spaces import SearchSpace, builtin_space_path, load_space
from tune_cells.space_weights import fit_space_to_weights
from tune_cells.tasks import TaskSpec, get_task, registered_name
from tune_cells.tracking_checks import check_experiment_active, check_store, sqlite_path

log = logging.getLogger(__name__)
MIN_FREE_BYTES = 1 << 30  # checkpoints, Ray results and the MLflow store of a small search
RESUME_MUST_MATCH = ("samples", "max_epochs", "grace_period", "reduction_factor", "seed", "folds", "max_store_size",
                     "time_budget")
# A search started before an option existed had this value (Ray restores the stopper a search began with)
RESUME_ABSENT_MEANS = {"time_budget": "None"}


@dataclass
class PreparedSearch:
    """Everything the preflight established; nothing of it is written yet."""

    task: TaskSpec
    space: SearchSpace
    workdir: WorkDir
    index: ImageIndex
    split: Split  # a new one is planned again by `check_pixels`, with near-duplicate groups
    experiment: str
    model_name: str
    tracking_uri: str
    store_size: StoreSize  # the square side classification images are decoded to, and why
    # Filled by the slow part of the preflight (`check_pixels`):
    duplicates: list[dict] = field(default_factory=list)  # near-identical images across split parts
    decoded: dict = field(default_factory=dict)  # train/val pixels by file path (never test pixels)
    resume_run_id: str = ""  # with --resume: the interrupted search's parent run ...
    resume_name: str = ""  # ... and its Ray experiment name
    folds: int = 1  # --folds: checked again on the split `check_pixels` plans


def check_workdir(workdir: Path, min_free: int = 0) -> WorkDir:
    """The workdir, if it exists or can be created, is writable and has `min_free` bytes free
    (nothing is created)."""
    workdir = WorkDir.at(workdir)
    probe = workdir.root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--workdir {workdir.root}: not writable ({probe} is not a writable folder)")
    free = shutil.disk_usage(probe).free
    if free < min_free:
        raise UserInputError(f"--workdir {workdir.root}: only {free / 2**30:.2f} GiB free, a search needs at least "
                             f"{min_free / 2**30:.0f} GiB")
    return workdir


def prepare_workdir(workdir: Path) -> WorkDir:
    workdir = check_workdir(workdir)
    workdir.root.mkdir(parents=True, exist_ok=True)
    return workdir


def check_tracking(uri: str, given_as: str = "--tracking-uri") -> None:
    """A sqlite file must be creatable; a server must be MLflow and answer; a database needs its
    driver; a file store is refused (see `tracking_checks`). Nothing is created here."""
    path = sqlite_path(uri)
    if path is not None:
        check_workdir(path.parent)
    else:
        check_store(uri, given_as)


def load_dataset(task: TaskSpec, data: Path | None, workdir: WorkDir) -> ImageIndex:
    if data is not None:
        root, inside = Path(data).expanduser().resolve(), workdir.root.resolve()
        below = inside.relative_to(root).parts if inside.is_relative_to(root) else None
        if task.scans_tree and below is not None and not any(part.startswith(".") for part in below):
            # (`cd DATA && tune-cells search folder --data .`): the next run would read the store as the
            # dataset's files; hidden folders are no importer's
            raise UserInputError(f"--workdir {workdir.root} is inside --data {data}: the working folder's files would be "
                                 "read as the dataset's; give a --workdir outside it, or a hidden one (DATA/.tune-cells)")
        return task.importer(Path(data))
    if task.demo is None:
        raise UserInputError(f"task {task.name} has no demo data: give --data DIR ({task.layout})")
    # Made in a temporary folder unless the workdir has it: the preflight writes nothing there, and
    # `place_demo_data` moves it in once every check has passed.
    staging = Path(tempfile.mkdtemp(prefix="tune-cells-demo-"))
    atexit.register(shutil.rmtree, staging, ignore_errors=True)  # a refused search's copy (moved: nothing left)
    index = task.importer(task.demo(workdir.demo_data(task.name), staging=staging / task.name))
    index.source = "demo"
    if index.root.resolve() == workdir.demo_data(task.name).resolve():
        staging.rmdir()  # not needed: the workdir's copy is current
    return index


def place_demo_data(prep: PreparedSearch) -> None:
    """Demo data the preflight made in a temporary folder, moved into the workdir (under its lock)."""
    home = prep.workdir.demo_data(prep.task.name)
    if prep.index.source == "demo" and prep.index.root.resolve() != home.resolve():
        from tune_cells.data.demo import place

        place(prep.index.root, home)
        prep.index.root = home


def check_space(space: SearchSpace, seed: int, kind: TaskKind | None = None) -> None:
    """Sample the space a few times so that typos fail now, not in trial 37: every sampled
    configuration (and every initial point) must parse as the kind's typed configuration, with
    the model's own keyword arguments. Without `kind`, each model's registered kind is used."""
    import optuna

    from tune_cells.models import (
        KEYWORD_RANGES,
        expected_weights_file,
        get_model,
        has_pretrained_weights,
        pretrained_arch,
        pretrained_available,
    )

    for name, (low, high) in KEYWORD_RANGES.items():  # on the declared bounds: samples might miss an end
        outside = [v for v in space.declared_numbers(name) if not low <= v <= high]
        if outside:
            raise UserInputError(f"{space.source}: parameter {name!r} = {outside[0]!r}: must be a number from {low:g} "
                                 f"to {high:g}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(32):
        trial = study.ask()
        configs.append(space.sample(trial))
        study.tell(trial, 0.0)
    fixed = space.fixed
    searched = sorted(name for name in PROMOTION_FIELDS if name in space.params and name not in fixed)
    if searched:  # a trial never reads it: sampling it would spend trials on identical training
        raise UserInputError(f"{space.source}: `{searched[0]}` is read at promotion, after the trials: give it one value")
    # An initial point sets only some parameters; the rest are sampled, so stand-ins fill them here.
    points = [{"model": configs[0].get("model"), "lr": 1e-3, **fixed, **point} for point in space.initial_points]
    for config in configs + points:
        for required in ("model", "lr"):
            if config.get(required) is None:
                raise UserInputError(f"{space.source}: the space sets no `{required}`")
        entry = get_model(config["model"])
        model_kind = get_kind(entry.kind)
        if kind is not None and model_kind is not kind:
            raise UserInputError(f"{space.source}: model {entry.name} is a {model_kind.name} model; this task is "
                                 f"{kind.name}")
        parsed = model_kind.parse_config(config, strict=True, source=space.source)
        if getattr(parsed, "image_size", None) and parsed.image_size < entry.min_image_size:
            raise UserInputError(f"{space.source}: {entry.name} needs image_size >= {entry.min_image_size} (its "
                                 f"feature maps collapse below that); the space gives {parsed.image_size}")
        if config.get("pretrained"):
            arch = pretrained_arch(config["model"], config.get("encoder"))
            if not has_pretrained_weights(arch):
                raise UserInputError(f"{space.source}: {arch} has no pretrained weights")
            if not pretrained_available(arch):
                raise UserInputError(
                    f"{space.source}: pretrained {arch} needs {expected_weights_file(arch)}: download it on a "
                    "machine with internet, or set TORCH_HOME to a cache that has it")


def check_inputs(opts: SearchOptions) -> PreparedSearch:
    """The quick part of the preflight: options, space, workdir, dataset index, split, store."""
    from tune_cells.tracking import resolve_tracking_uri

    task = get_task(opts.task)
    check_options(opts)
    if opts.data is not None:  # a mistyped --data is said before the space's weights are looked for (seconds)
        require_dir(opts.data)
    check_local_resources(opts.cpus_per_trial, opts.gpus_per_trial, opts.address)
    check_ray_address(opts.address)  # Ray would retry for minutes, the store opened beside it
    space = fit_space_to_weights(load_space(opts.space or builtin_space_path(task.default_space)))
    check_space(space, opts.seed, task.kind)
    workdir = check_workdir(opts.workdir, MIN_FREE_BYTES)
    check_storage(opts.storage)
    index = load_dataset(task, opts.data, workdir)
    if opts.group_pattern is not None:
        apply_group_pattern(index, opts.group_pattern)
    # A new split is planned here by group key only, so that a dataset too small to split fails
    # fast; `check_pixels` plans it again once the hashes know the near-duplicates.
    split = plan_split(workdir.split_file(task.name, index.fingerprint, opts.seed), index, opts.seed)
    check_folds(task, index, split, opts.folds, opts.seed)
    tracking_uri = resolve_tracking_uri(opts.tracking_uri, workdir)
    check_tracking(tracking_uri, "--tracking-uri" if opts.tracking_uri else "MLFLOW_TRACKING_URI")
    model_name = registered_name(task.name, demo=index.source == "demo")
    prep = PreparedSearch(task, space, workdir, index, split, opts.experiment or model_name, model_name, tracking_uri,
                          store_size(task, index, opts.max_store_size, space.largest("image_size")))
    check_experiment_active(tracking_uri, prep.experiment)
    if opts.resume:
        prep.resume_run_id, prep.resume_name = find_interrupted_search(opts, prep)
    prep.folds = opts.folds
    return prep


def check_folds(task: TaskSpec, index: ImageIndex, split: Split, folds: int, seed: int) -> None:
    """--folds K: the pooled parts cut as trials will cut them (by class, never splitting a group), so
    that too few images or groups of a class for K folds is said now, not after the store is opened."""
    if folds > 1:
        from tune_cells.data.folds import fold_of, pooled_groups

        pooled = split.parts["train"] + split.parts["val"]
        fold_of(len(pooled), folds, seed, task.kind.fold_labels(index, pooled), pooled_groups(split), index.classes)


def store_size(task: TaskSpec, index: ImageIndex, max_store_size: int | None = None,
               largest_input: float | None = None) -> StoreSize:
    """The decode size of this dataset (one log line says which and why); `max_store_size` is the
    user's cap (--max-store-size), replacing the task's. `largest_input`, the largest `image_size`
    the space can ask for, caps it too (never below the task's floor): pixels decoded beyond what a
    trial feeds its network cost memory and a resize per batch and bought nothing (blood, decoded
    at 256 px for 128-px trials: test accuracy 0.981 against 0.986 at 128 px, same search)."""
    largest, cap = (task.max_store_size, "max store size") if max_store_size is None else (max_store_size,
                                                                                          "--max-store-size")
    if largest > 0 and largest_input and max(int(largest_input), task.min_store_size) < largest:
        largest, cap = max(int(largest_input), task.min_store_size), "the space's largest image_size"
    chosen = choose_store_size(index.root, list(index.items["path"]), task.min_store_size, largest, cap=cap)
    if chosen.size:
        memory = decoded_bytes(len(index.items), chosen.size, task.channels)
        log.info("decoding %s images at %d px: %s; %.0f MB held in memory", task.name, chosen.size, chosen.reason,
                 memory / 1e6)
    return chosen


def check_pixels(prep: PreparedSearch) -> None:
    """The slow part of the preflight: every image decodes (their pixels for training are kept),
    a new split keeps near-duplicates together, and near-identical images that an existing split
    file leaves in two parts are found."""
    def plan(scan: ImageScan) -> Split:
        if not prep.split.is_new:
            return prep.split
        return plan_split(prep.split.path, prep.index, prep.split.seed, scan.hashes)

    scan, prep.split, prep.decoded = decode_once(prep.task, prep.index, plan, prep.store_size.size)
    check_folds(prep.task, prep.index, prep.split, prep.folds, prep.split.seed)  # near-duplicates merge groups
    prep.duplicates = cross_split_duplicates(prep.split, list(prep.index.items["path"]), scan.hashes)


def decode_once(task: TaskSpec, index: ImageIndex, plan: Callable[[ImageScan], Split],
                store_size: int) -> tuple[ImageScan, Split, dict]:
    """The one decoding pass of a search: check that every image (and mask) decodes and hash it,
    keeping every image's pixels in the form training uses; `plan` the split from the hashes; then
    keep only the train and validation pixels. Test pixels are dropped before anything is handed
    on: the test part is read only after promotion. Returns (hashes, split, pixels by file path)."""
    scan = task.kind.decode_for_search(task, index, store_size)
    split = plan(scan)
    fitting = index.files_of(split.parts["train"] + split.parts["val"])
    decoded = {name: pixels for name, pixels in scan.kept.items() if name in fitting}
    scan.kept = {}
    return scan, split, decoded


def ray_storage(opts: SearchOptions, prep: PreparedSearch) -> str:
    if not opts.storage:
        return str(prep.workdir.ray_storage(prep.experiment))
    return storage_for_ray(opts.storage)


def find_interrupted_search(opts: SearchOptions, prep: PreparedSearch) -> tuple[str, str]:
    """(parent run id, Ray experiment name) of the latest search of the experiment, which must be
    unfinished, resumable from its Ray state, and started with the same data and budget flags."""
    from tune_cells import ray_backend
    from tune_cells.tracking import Tracker

    tracker = Tracker(prep.tracking_uri, prep.workdir.artifacts)
    if not tracker.store_exists():
        raise UserInputError(f"--resume: no MLflow store at {without_credentials(prep.tracking_uri)}, so no search "
                             "to resume")
    latest = tracker.latest_search(prep.experiment)
    if latest is None:
        raise UserInputError(f"--resume: experiment {prep.experiment} has no search to resume")
    logged = LoggedSearch.of(latest)
    name = logged.ray_experiment
    if logged.status == "FINISHED":
        raise UserInputError(f"--resume: the latest search of {prep.experiment} ({name}) finished; nothing to resume")
    storage = ray_storage(opts, prep)
    if not name or not ray_backend.can_resume(storage, name):
        raise UserInputError(f"--resume: no Ray state for {name or 'the latest search'} under {storage}")
    if not prep.split.path.exists():
        copy = f"split/{logged.split_file or prep.split.path.name}"
        raise UserInputError(f"--resume: the split file {prep.split.path} of search {name} is missing (deleted?); "
                             f"its copy is logged with the search run ({logged.run_id}, artifact {copy}): "
                             "put it back there to resume")
    if logged.split_sha256 != prep.split.sha256:
        raise UserInputError(f"--resume: search {name} used another split or dataset than --data gives now")
    searched = tracker.artifact_text(logged.run_id, "search_space.yaml")
    if searched is not None and searched != prep.space.to_yaml():  # Ray restores the old searcher; decoding,
        # the initial points and promotion would follow the new space
        raise UserInputError(f"--resume: search {name} searched another space than {prep.space.source} gives now "
                             f"(started with --space {logged.space or '?'}; its space is logged "
                             "with the search run as search_space.yaml): give that space again")
    for key in RESUME_MUST_MATCH:
        given, started = str(getattr(opts, key)), latest.data.params.get(key, RESUME_ABSENT_MEANS.get(key))
        if started is not None and given != started:
            flag = f"--{key.replace('_', '-')}"
            was = f"without {flag}" if started == "None" else f"with {flag} {started}"
            now = f"not {flag} {given}" if given != "None" else f"give {flag} {started} again"
            raise UserInputError(f"--resume: search {name} was started {was}: {now}")
    return logged.run_id, name
