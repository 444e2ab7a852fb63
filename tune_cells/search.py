"""One search, start to finish: preflight, split, trials, promotion (evaluation follows in a new process).

Orchestration only: the checks are in `preflight`, what differs by task kind in `kinds`, Ray in
`ray_backend`, MLflow in `tracking`, and what follows the trials in `analysis.promotion`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from tune_cells.analysis import selection
from tune_cells.analysis.promotion import SearchOutcome, promote
from tune_cells.data.images import allow_decoding, cancel_decoding
from tune_cells.data.reader import SplitReader
from tune_cells.data.splits import Split, dataset_record, describe_groups, save_split
from tune_cells.lock import WorkdirLock
from tune_cells.logged_runs import STOPPED_BY_TIME_BUDGET, LoggedSearch
from tune_cells.preflight import PreparedSearch, SearchOptions, check_inputs, check_pixels, prepare_workdir, ray_storage
from tune_cells.resources import TrialResources, trial_resources
from tune_cells.tracking import without_credentials

log = logging.getLogger(__name__)


def run_search(opts: SearchOptions) -> SearchOutcome:
    started = time.time()
    prep = check_inputs(opts)
    try:
        outcome = _search_with_decoding_beside_ray(opts, prep)
    finally:
        allow_decoding()  # the decoding thread has ended: later passes in this process decode again
    outcome.wall_time_s = time.time() - started
    return outcome


def _search_with_decoding_beside_ray(opts: SearchOptions, prep: PreparedSearch) -> SearchOutcome:
    from tune_cells import ray_backend
    from tune_cells.ray_progress import signals_cancel_decoding

    object_store_bytes = None if opts.address else _object_store_bytes(prep)  # (before demo data moves)
    with WorkdirLock(prep.workdir, "search"), ThreadPoolExecutor(max_workers=1) as pool:
        # Ray's start mostly waits for its processes. Meanwhile: decode every image (Pillow works
        # without the GIL) and then open the MLflow store (a fresh one spends seconds on its
        # schema). A bad image still stops the search before the workdir or the store is touched.
        store = pool.submit(_check_pixels_and_open_store, prep)
        try:
            with signals_cancel_decoding():
                resources = ray_backend.init(opts.address, num_cpus=os.cpu_count(), verbose=opts.verbose,
                                             object_store_bytes=object_store_bytes)
                tracker, experiment_id = store.result()
            wanted = trial_resources(opts.cpus_per_trial, opts.gpus_per_trial, opts.address, resources)
            outcome = _tracked_search(opts, prep, wanted, tracker, experiment_id)
        except BaseException:
            cancel_decoding()  # interrupted while the images decode: the pool's wait is moments, no store opens
            raise
        finally:
            ray_backend.shutdown()
    return outcome


def _check_pixels_and_open_store(prep: PreparedSearch):
    """The slow preflight, then (only if it passed) the workdir, the store and the experiment."""
    from tune_cells.preflight import place_demo_data
    from tune_cells.tracking import Tracker

    place_demo_data(prep)  # (demo images always decode) before the decoding: the split records where they are
    check_pixels(prep)
    prepare_workdir(prep.workdir)
    tracker = Tracker(prep.tracking_uri, prep.workdir.artifacts)
    return tracker, tracker.experiment_id(prep.experiment)


def _object_store_bytes(prep: PreparedSearch) -> int:
    return max(128 << 20, 3 * prep.task.kind.object_store_bytes(prep.task, prep.index, prep.split,
                                                                   prep.store_size.size))


def _tracked_search(opts: SearchOptions, prep: PreparedSearch, resources: TrialResources, tracker,
                    experiment_id: str) -> SearchOutcome:
    from tune_cells import ray_backend
    from tune_cells.live_study import StudyJournal
    from tune_cells.trial_recorder import EventSinks, TrialRecorder, budget_reached_before
    from tune_cells.warm_start import WarmStart, earlier_trials

    task, kind = prep.task, prep.task.kind
    split = save_split(prep.split)
    reader = SplitReader(prep.index, split, task.channels, prep.store_size.size, prep.workdir, prep.decoded)
    log.info("dataset %s: %d images, %s; split %s", prep.index.root, len(prep.index.items), kind.describe(prep.index),
             split.sizes())
    log.info("split groups: %s", describe_groups(split))
    if split.excluded:
        first = split.excluded[0]
        log.warning("%d images left out of training and validation: near-duplicates of images that the layout fixes in "
                    "the %s part (e.g. %s, group %s); listed under `excluded` in %s", len(split.excluded),
                    first.get("kept_in", "test"), first["path"], first.get("group", "?"), split.path)
    trial = kind.trial_inputs(task, prep.index, reader, opts.max_epochs, opts.seed, opts.folds)

    if prep.duplicates:
        first = prep.duplicates[0]
        log.warning("%d near-identical image pairs across split parts (e.g. %s in %s ~ %s in %s): held-out "
                    "metrics may be optimistic; edit %s to move them into one part", len(prep.duplicates),
                    first["path_a"], first["part_a"], first["path_b"], first["part_b"], split.path)
    warm = WarmStart()
    if opts.warm_start and opts.resume:
        log.info("warm start: the resumed search's study already holds the earlier trials it started from")
    elif opts.warm_start:  # read before this search's own run exists
        warm = earlier_trials(tracker, experiment_id, prep.space, task.name, task.metric, task.mode, prep.index.classes)
    dataset = dataset_record(prep.index, split)  # the split as an MLflow dataset (search, trial and evaluation runs)
    if opts.resume:
        parent, search_name = prep.resume_run_id, prep.resume_name
        tracker.reopen_run(parent)
        resumes = LoggedSearch.of(tracker.get_run(parent)).resumes + 1  # the card's time spans them
        tracker.set_tags(parent, {"resumes": str(resumes)})
        log.info("resuming search %s (%s)", search_name, parent)
    else:
        search_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        parent = tracker.start_run(experiment_id, search_name, "search", source=f"tune-cells search {task.name}", tags={
            "task": task.name, "data_root": str(prep.index.root), "data_source": prep.index.source,
            "split_file": split.path.name, "split_sha256": split.sha256, "ray_experiment": search_name,
            **({"warm_start_trials": len(warm.trials)} if opts.warm_start else {}),
        })
    journal = None  # the live view, once opened
    try:
        if not opts.resume:
            _log_search_inputs(tracker, parent, opts, prep, split, trial.data, resources)
            tracker.log_dataset(parent, dataset, "training")
            test_metric = "test_" + task.metric.removeprefix("val_")  # logged on the search run once evaluated
            tracker.set_runs_view(experiment_id, [f"best_{task.metric}", task.metric, test_metric])
        recorder = TrialRecorder(tracker, experiment_id, parent, opts.max_epochs, trial.metric_keys,
                                 common_tags={"split_sha256": split.sha256}, summary_keys=trial.summary_keys,
                                 source=f"tune-cells search {task.name}", dataset=dataset)
        if opts.resume:  # the trial → run map lives in MLflow (each child run is tagged with its trial id)
            recorder.runs.update(tracker.trial_runs(experiment_id, parent))
        journal = StudyJournal(prep.workdir.optuna_journal, search_name, prep.space, task.metric, task.mode,
                               opts.max_epochs, {"task": task.name, "experiment": prep.experiment, "mlflow_run_id": parent},
                               warm.trials, recorder.runs.get)
        journal.open()
        events = EventSinks([recorder, journal])
        untried = warm.untried(prep.space.initial_points)  # --warm-start: points earlier searches ran are not rerun
        result = ray_backend.run_search(ray_backend.SearchRequest(
            trainable=trial.trainable, trainable_kwargs={"data": trial.data}, space=prep.space,
            metric=task.metric, mode=task.mode, samples=opts.samples, seed=opts.seed,
            max_epochs=opts.max_epochs, grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
            trial_resources=resources, name=search_name, events=events,
            storage_path=ray_storage(opts, prep), initial_points=untried,
            warm_trials=warm.trials,
            max_concurrent=opts.max_concurrent, resume=opts.resume,
            time_budget_s=opts.time_budget * 60 if opts.time_budget else None,
            recipe=selection.recipe_for_asha(kind, trial.data, untried, opts.max_latency_ms),
        ))
        if result.time_budget_reached:
            _end_trials_the_budget_stopped(result, events, opts)
        elif opts.resume and opts.time_budget:
            result = budget_reached_before(result, tracker, experiment_id, parent)
        tracker.end_orphaned_trial_runs(experiment_id, parent, {t.trial_id: t.failed for t in result.trials})
        journal.close()
        return promote(tracker, parent, prep, split, result, recorder.runs, opts.max_epochs, trial.data,
                       opts.max_latency_ms, _member_retrainer(opts, prep, trial, resources, search_name, recorder))
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        tracker.set_tags(parent, {"failure": without_credentials(f"{type(exc).__name__}: {exc}")[:500]})
        tracker.kill_running_trial_runs(experiment_id, parent)  # interrupted: resumable, its unfinished trials too
        if journal is not None and not interrupted:
            journal.close("the search failed")
        if interrupted:
            log.warning("search %s interrupted; nothing promoted. Continue it: tune-cells search %s --resume "
                        "(with the same flags)", search_name, task.name)
        tracker.end_run(parent, "KILLED" if interrupted else "FAILED")
        raise


def _member_retrainer(opts: SearchOptions, prep: PreparedSearch, trial, resources: TrialResources, search_name: str,
                      recorder):
    """Retrains for a champion promoted as an ensemble (`ensemble: N`), on this search's Ray and storage,
    each with an MLflow run beside the trials' (`recorder`: the search's TrialRecorder)."""
    from tune_cells.ray_seeds import member_retrainer

    return member_retrainer(trial.trainable, {"data": trial.data}, prep.task.metric, prep.task.mode, resources,
                            opts.address, ray_storage(opts, prep), search_name, recorder)


def _end_trials_the_budget_stopped(result, events, opts: SearchOptions) -> None:
    """Ray reports no end for the trials its time budget stops: the search records them itself."""

    for cut in (t for t in result.trials if t.trial_id in result.stopped_by_time_budget):
        events.on_trial_end(cut.trial_id, False, {**cut.last_result, STOPPED_BY_TIME_BUDGET: True}, None)
    log.warning("time budget of %g min reached: running trials stopped at their last epoch (%d), trials never "
                "started (%d of %d); promoting from what the trials reported", opts.time_budget,
                len(result.stopped_by_time_budget), max(0, opts.samples - len(result.trials)), opts.samples)


def _promotion_policy(opts: SearchOptions, prep: PreparedSearch, data) -> str:
    """How the champion will be chosen, in words (the model card's "Chosen by")."""
    task = prep.task
    if selection.rule_applies(task.kind, data, prep.space.initial_points, opts.max_latency_ms):
        return (f"the one-SE rule: the space's first initial point that ran, unless the best trial by {task.metric} "
                "leads it on validation by more than the standard error; its best-epoch checkpoint")
    fits = " whose latency fits --max-latency-ms" if opts.max_latency_ms is not None else ""
    return f"best trial{fits} by {task.mode} {task.metric} over all its epochs; its best-epoch checkpoint"


def _log_search_inputs(tracker, parent: str, opts: SearchOptions, prep: PreparedSearch, split: Split, data,
                       resources: TrialResources) -> None:
    from tune_cells.models import cached_pretrained_architectures

    task = prep.task
    tracker.log_params(parent, {
        **{k: without_credentials(v) for k, v in asdict(opts).items()
           if k not in ("data", "workdir", "space", "task", "verbose")},
        "trial_cpus": resources.cpus, "trial_gpus": "per model" if resources.gpus is None and resources.use_gpus
        else resources.gpus or 0,
        "task": task.name, "data": str(prep.index.root), "space": prep.space.source, "workdir": str(prep.workdir.root),
        "metric": task.metric, "mode": task.mode, "split_sha256": split.sha256,
        "store_size": prep.store_size.size, "store_size_reason": prep.store_size.reason[:500],
        "classes": ",".join(prep.index.classes), "images": len(prep.index.items),
        **{f"split_{part}": n for part, n in split.sizes().items()},
        "near_duplicates_across_splits": len(prep.duplicates),
        "split_groups": "not recorded" if split.groups is None else len(split.groups),
        "split_groups_merged_by_near_duplicates": split.grouping.get("merged_by_near_duplicates", "not recorded"),
        "split_excluded_twins": len(split.excluded),
        # (Listing the cache imports torchvision: seconds a space without pretrained models need not wait.)
        "pretrained_weights_cached": (",".join(cached_pretrained_architectures()) or "none")
        if prep.space.may_use_pretrained else "not used by the space",
        "promotion_policy": _promotion_policy(opts, prep, data),
    })
    summary = {
        "root": str(prep.index.root), "source": prep.index.source, "kind": task.kind.name,
        "classes": prep.index.classes, "counts": task.kind.part_counts(prep.index, split),
        "train_channel_mean": data.mean, "train_channel_std": data.std, "grouping": split.grouping,
        "excluded": split.excluded,
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
