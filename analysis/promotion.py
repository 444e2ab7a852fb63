"""After the trials: register the best trial's best checkpoint, point `champion` at it, pin its
configuration, and hand over to evaluation in a fresh process."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tune_cells.failpoints import kill_at
from tune_cells.logged_runs import LoggedVersion
from tune_cells.paths import WorkDir
from tune_cells.tracking import CHALLENGER, CHAMPION, NOTE_TAG

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    task: str
    workdir: WorkDir
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
    decision: Decision
    latency_note: str = ""  # with --max-latency-ms: the promoted trial's latency, and the best trial's
    selection_note: str = ""  # the one-SE rule, where it promoted an initial point over the best trial
    stopped_by_budget: int = 0  # trials --time-budget stopped before their last epoch


def promote(tracker, parent: str, prep, split, result, trial_runs: dict[str, str], max_epochs: int,
            data, max_latency_ms: float | None = None, retrain=None) -> SearchOutcome:
    """The promotion pipeline of a search (`prep`: its PreparedSearch, `result`: Ray's SearchResult,
    `data`: the trials' train/validation data):

    measure each finished trial's cost (parameters, latency per image) → take the best trial (with
    `max_latency_ms`: the best whose latency fits) → stage its best checkpoint and finish it on
    validation (test-time augmentation, temperature; with `ensemble: N` in its configuration and
    `retrain` (seed_ensemble.Retrain), first N-1 other networks joined into one model: the search's
    next-best complete trials, or retrains of its configuration) → register it
    (one version per search, keyed by the search run) → decide: champion, or challenger → move the
    aliases → finish the search run.

    Every step is idempotent, so a promotion killed at any step is completed by `search --resume`:
    one version per search, the right `champion` and `previous-champion`, no run left RUNNING.
    """
    from tune_cells.analysis import latency, selection

    task, name = prep.task, prep.model_name
    staging = prep.workdir.promotion_staging(parent)
    costs = latency.measure_trials(tracker, result, trial_runs, task.mode, staging)
    kill_at("measured")
    existing = tracker.version_of_search(name, parent)
    overall = result.best_trial_id
    rule = ""
    if max_latency_ms is None:  # a latency budget picks among its own fitting trials; deterministic, so a
        # resumed promotion chooses again the trial its first attempt registered (`existing`, kept below)
        se = task.kind.selection_error(data, result)
        if se is None and selection.rule_applies(task.kind, data, prep.space.initial_points, max_latency_ms):
            log.info("one-SE rule skipped: the best trial reported no standard error of %s (a trial from before it "
                     "was reported); the best trial is promoted", task.metric)
        result, rule = selection.prefer_recipe(result, prep.space.initial_points, se, task.mode)
        if rule:
            log.info("%s", rule)
    result, note = latency.within_budget(result, costs, max_latency_ms, task.name,
                                         LoggedVersion.of(existing).ray_trial_id if existing is not None else None)
    version = _register(tracker, parent, prep, split, result, trial_runs, staging, data,
                        costs, max_latency_ms, retrain, max_epochs)
    kill_at("registered")
    decision = _decide(tracker, name, version, task, max_latency_ms, staging)
    kill_at("decided")
    if decision.champion:
        tracker.move_champion(name, version, decision.previous)
    else:
        tracker.set_alias(name, CHALLENGER, version)
    kill_at("moved")

    failed = sum(t.failed for t in result.trials)
    ended_early = [t for t in result.trials if not t.failed and t.iterations < max_epochs]
    by_budget = sum(t.trial_id in result.stopped_by_time_budget for t in ended_early)
    stopped = len(ended_early) - by_budget  # by ASHA
    tracker.log_metrics(parent, {f"best_{task.metric}": result.best_metric, "trials_failed": failed,
                                 "trials_stopped_early": stopped, "trials_stopped_by_time_budget": by_budget,
                                 "trials": len(result.trials),
                                 "searcher_trials": result.searcher_trials})
    moved_by_rule = rule if result.best_trial_id != overall else ""  # the rule promoted a recipe over the best
    note_tag = (f"{'Best' if result.best_trial_id == overall else 'Promoted'} trial `{result.best_trial_id}`: "
                f"{task.metric} {result.best_metric:.4f} at epoch {result.best_epoch}. Registered as [{name} version "
                f"{version}](#/models/{name}/versions/{version}) ({decision.reason})."
                + (f" {moved_by_rule[0].upper()}{moved_by_rule[1:]}." if moved_by_rule else ""))
    tracker.set_tags(parent, {
        "best_trial_id": result.best_trial_id, "best_trial_run_id": trial_runs.get(result.best_trial_id, ""),
        "best_trial_overall": overall, "selection": rule or "best trial", "model_name": name, "model_version": version,
        "previous_champion": decision.previous or "", "promotion": decision.reason,
        "ray_experiment_path": result.experiment_path, "latency_protocol": latency.protocol(latency.prediction_device()),
        "latency_budget_ms": f"{max_latency_ms:g}" if max_latency_ms else "none",
        "model_uri": f"models:/{name}/{version}", NOTE_TAG: note_tag})
    tracker.link_model(parent, tracker.client.get_model_version(name, version))  # on the search run's page
    best_config_file = export_best_config(prep, parent, result)
    tracker.log_artifact(parent, best_config_file)
    tracker.end_run(parent)
    shutil.rmtree(staging, ignore_errors=True)
    return SearchOutcome(
        task=task.name, workdir=prep.workdir, metric=task.metric, experiment=prep.experiment, parent_run_id=parent,
        model_name=name, model_version=version, best_trial_id=result.best_trial_id,
        best_metric=result.best_metric, best_epoch=result.best_epoch, best_config=result.best_config,
        trials=len(result.trials), failed_trials=failed, stopped_early=stopped, stopped_by_budget=by_budget,
        wall_time_s=0.0,
        tracking_uri=tracker.tracking_uri, best_config_file=best_config_file, decision=decision, latency_note=note,
        selection_note=moved_by_rule,
    )


@dataclass(frozen=True)
class Decision:
    champion: bool  # else challenger
    reason: str  # one line, for the summary and the version's tags
    previous: str | None = None  # the champion it replaces


def _decide(tracker, name: str, version: str, task, max_latency_ms: float | None, staging: Path) -> Decision:
    """Champion when there is none, or when this version is better on validation data that both
    were scored on (the same split file), or (with a latency budget) when the champion's latency
    exceeds it; else challenger. Written on the version before any alias moves, so a resumed
    promotion repeats the same decision."""
    from tune_cells.analysis.latency import champion_over_budget

    mine = tracker.client.get_model_version(name, version).tags
    if "promotion" in mine:  # an earlier attempt decided
        return Decision(mine["promotion"] == CHAMPION, mine.get("promotion_reason", ""),
                        mine.get("previous_champion") or None)
    champion = tracker.version_for_alias(name, CHAMPION)
    slow = None
    if max_latency_ms is not None and champion is not None and str(champion.version) != version:
        slow = champion_over_budget(tracker, champion, max_latency_ms, staging)
    decision = compare(mine, champion, task.metric, task.mode) if slow is None else Decision(
        True, f"champion: champion version {champion.version} is over the latency budget ({slow:.3g} ms > "
              f"{max_latency_ms:g} ms per image)", previous=str(champion.version))
    tracker.set_version_tags(name, version, {
        "promotion": CHAMPION if decision.champion else CHALLENGER, "promotion_reason": decision.reason,
        "previous_champion": decision.previous or ""})
    return decision


def compare(mine: dict, champion, metric: str, mode: str) -> Decision:
    """The rule: `mine` (a version's tags) against the current champion (a ModelVersion or None)."""
    if champion is None:
        return Decision(True, "champion: there was none")
    theirs = champion.tags
    if theirs.get("split_sha256") != mine.get("split_sha256"):
        return Decision(False, f"challenger: not comparable with champion version {champion.version} "
                               "(scored on another split file)")
    ours, best = _validation_score(mine, metric), _validation_score(theirs, metric)
    better = ours > best if mode == "max" else ours < best
    sign = (">" if better else "<=") if mode == "max" else ("<" if better else ">=")
    if better:
        return Decision(True, f"champion: better on validation ({metric} {ours:.4f} {sign} {best:.4f} of version "
                              f"{champion.version})", previous=str(champion.version))
    return Decision(False, f"challenger: not better on validation ({metric} {ours:.4f} {sign} {best:.4f} of "
                           f"champion version {champion.version})")


def _validation_score(tags: dict, metric: str) -> float:
    """The validation score of a version as it predicts (older versions: its trial's best epoch)."""
    return float(tags.get("validation_score", tags.get(metric, "nan")))


def promote_by_hand(tracker, name: str, version: str) -> str | None:
    """`tune-cells promote`: `champion` → `version` whatever the rule says, logged on the version;
    returns the champion it replaced (`version` itself where it already was the champion: nothing
    is written, so the champion it had replaced stays recorded)."""
    import time

    champion = tracker.version_for_alias(name, CHAMPION)
    if champion is not None and str(champion.version) == version:
        return version
    previous = str(champion.version) if champion is not None else None
    tracker.set_version_tags(name, version, {
        "promotion": CHAMPION, "promotion_reason": f"champion: promoted by hand ({time.strftime('%Y-%m-%d %H:%M')})",
        "previous_champion": previous or "", "promoted_by_hand": time.strftime("%Y-%m-%dT%H:%M:%S")})
    tracker.move_champion(name, version, previous)
    challenger = tracker.version_for_alias(name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        tracker.delete_alias(name, CHALLENGER)
    return previous


def _register(tracker, parent: str, prep, split, result, trial_runs: dict[str, str], staging: Path, data,
              costs=(), max_latency_ms: float | None = None, retrain=None, max_epochs: int = 0) -> str:
    """The search's registered version: the one an earlier attempt registered, else a new one
    from the best checkpoint, staged in the working folder (not the system's temp folder); tagged
    with its cost as it predicts (`costs`: each trial's latency.TrialCost)."""
    from tune_cells.analysis.latency import allows_tta, cost_of, version_cost_tags
    from tune_cells.model_io import strip_training_state
    from tune_cells.ray_checkpoints import copy_checkpoint

    task = prep.task
    existing = tracker.version_of_search(prep.model_name, parent)
    if existing is not None:
        return str(existing.version)
    checkpoint = copy_checkpoint(result.best_checkpoint, staging / "checkpoint")
    strip_training_state(checkpoint)
    best_run = trial_runs.get(result.best_trial_id, "")
    cost = cost_of(costs, result.best_trial_id)
    ensemble = _ensemble(task, checkpoint, data, max_latency_ms, retrain, staging,
                         {"retrain_of_trial_run_id": best_run, "retrain_of_ray_trial_id": result.best_trial_id},
                         result, max_epochs)
    if not ensemble.seeds and not ensemble.not_built:  # (a failed retrain's run stays, FAILED, to say why)
        _supersede_unused_members(tracker, parent)
    if ensemble.size:
        checkpoint = staging / "ensemble"
        # retrains cost what the champion does; trials their own (measured on each, as the champion's)
        member_costs = [cost] * ensemble.size if ensemble.seeds else [cost_of(costs, t) for t in ensemble.trials]
        cost = replace(cost, param_count=sum(c.param_count for c in member_costs),
                       latency_ms=sum(c.latency_ms for c in member_costs)) if None not in member_costs else None
    allow_tta = allows_tta(cost, max_latency_ms)
    chosen = {"validation_score": result.best_metric, **task.kind.finalize(checkpoint, data, allow_tta=allow_tta)}
    if ensemble.not_built:
        chosen["ensemble_not_built"] = ensemble.not_built[:500]
    if ensemble.seeds:
        chosen["ensemble_seeds"] = ",".join(map(str, ensemble.seeds))
        chosen["ensemble_member_run_ids"] = _member_run_ids(tracker, parent, best_run, ensemble.seeds)
    elif ensemble.trials:
        chosen["ensemble_trials"] = ",".join(ensemble.trials)
        chosen["ensemble_member_run_ids"] = ",".join(trial_runs.get(t, "") for t in ensemble.trials)
    chosen.update(version_cost_tags(cost, str(chosen.get("tta", "none")), max_latency_ms))
    kill_at("staged")
    return tracker.log_model(best_run or parent, checkpoint, prep.model_name, tags={
        "task": task.name, "search_run_id": parent, "trial_run_id": best_run, "ray_trial_id": result.best_trial_id,
        "epoch": result.best_epoch, task.metric: f"{result.best_metric:.6f}", "data_root": str(prep.index.root),
        "split_file": str(split.path), "split_seed": split.seed, "split_sha256": split.sha256,
        **{key: f"{value:.6f}" if isinstance(value, float) else value for key, value in chosen.items()},
    }, signature=task.kind.signature(list(prep.index.classes)))


@dataclass(frozen=True)
class Ensemble:
    """What `_ensemble` built in staging/ensemble: retrains' seeds or trials' ids (the champion's
    first), or neither, with why where retrains failed."""
    seeds: list[int] = field(default_factory=list)
    trials: list[str] = field(default_factory=list)
    not_built: str = ""

    @property
    def size(self) -> int:
        return len(self.seeds) or len(self.trials)


def _ensemble(task, checkpoint: Path, data, max_latency_ms: float | None, retrain, staging: Path,
              retrains_of: dict, result, max_epochs: int) -> Ensemble:
    """Where the promoted configuration asks for an ensemble (`ensemble: N`), build it in
    `staging`/ensemble from `checkpoint` and N-1 other networks: the search's next-best complete
    trials (`ensemble_members: trials`, where enough qualify), else retrains of its configuration
    (their MLflow runs tagged with `retrains_of`). One network where a retrain failed: the champion
    trained and validated, so it is promoted alone rather than not at all (a resume would only
    repeat a diverging seed)."""
    from tune_cells.analysis import seed_ensemble, trial_ensemble
    from tune_cells.errors import RetrainFailed
    from tune_cells.model_io import load_spec

    config = task.kind.parse_config(load_spec(checkpoint).config, strict=False)
    size = config.ensemble
    reason = seed_ensemble.skip_reason(size, data.folds, max_latency_ms)
    if reason or size <= 1:
        if reason:
            log.info("%s", reason)
        return Ensemble()
    if config.ensemble_members == "trials":
        members = trial_ensemble.complete_trials(result, size, max_epochs, task.mode)
        if len(members) == size - 1:
            trials = trial_ensemble.join_trials(checkpoint, result.best_trial_id, members, staging / "ensemble")
            log.info("ensemble: %d: the promoted trial %s and the next-best trials that trained all %d epochs: %s",
                     size, trials[0], max_epochs, ", ".join(trials[1:]))
            kill_at("ensembled")
            return Ensemble(trials=trials)
        log.info("ensemble: %d: %d other trial(s) trained all %d epochs with the champion's input, %d needed: "
                 "retraining the champion's configuration instead", size, len(members), max_epochs, size - 1)
    if retrain is None:
        return Ensemble()
    try:
        seeds = seed_ensemble.extend_with_retrains(checkpoint, size, retrain, staging / "ensemble", retrains_of)
    except RetrainFailed as exc:
        not_built = f"ensemble: {size}: {exc}"
        log.warning("%s; the champion is promoted as one network", not_built)
        return Ensemble(not_built=not_built)
    kill_at("ensembled")
    return Ensemble(seeds=seeds)


def _supersede_unused_members(tracker, parent: str) -> None:
    """Retrain runs of an earlier attempt of this promotion that built no ensemble in the end (resumed
    with --max-latency-ms, which skips it): ended, tagged and soft-deleted, as when retrained again,
    so none stays RUNNING under a finished search or looks like a part of the registered model."""
    from tune_cells.trial_recorder import ENSEMBLE_MEMBER

    for run in tracker.retrain_children(tracker.get_run(parent).info.experiment_id, parent, ENSEMBLE_MEMBER):
        tracker.supersede_run(run.info.run_id, "the resumed promotion registered one network, not an ensemble")


def _member_run_ids(tracker, parent: str, champion_run: str, seeds: list[int]) -> str:
    """The members' MLflow runs in `seeds`' order (the version's `ensemble_seeds`): the champion
    trial's, then each retrain's, read back from MLflow, so also where a resumed promotion reused
    the retrains of an earlier attempt ('' for a member without a finished run)."""
    from tune_cells.trial_recorder import ENSEMBLE_MEMBER, retrain_runs_by_seed

    retrains = tracker.retrain_children(tracker.get_run(parent).info.experiment_id, parent, ENSEMBLE_MEMBER,
                                        finished_only=True)
    by_seed = retrain_runs_by_seed(retrains)
    return ",".join([champion_run, *(by_seed.get(seed, "") for seed in seeds[1:])])


def export_best_config(prep, parent: str, result) -> Path:
    """The champion's configuration as a pinned space (every parameter fixed): `--space` reruns it."""
    import yaml

    path = prep.workdir.best_config(prep.experiment, parent)
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
               "--workdir", str(outcome.workdir.root)]
    # The URI travels in the environment: a command line is visible to every user (`ps`).
    return subprocess.call(command, env={**os.environ, "MLFLOW_TRACKING_URI": outcome.tracking_uri})
