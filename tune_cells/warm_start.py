"""`search --warm-start`: a new search begins from what earlier searches of the task and space learned.

Read back from MLflow, the record of every search: the finished trial runs of the experiment's
earlier searches of the same task and classes (a score means something else on other classes: 0.5
balanced accuracy is chance for 2, good for 10) whose space has the same name (`SearchSpace.name`).
Searches of another task or class list in the same experiment are left out, and said so; with none
left, the search starts cold (a warm start is a hint to the sampler, not a condition of the search). Each becomes a COMPLETE Optuna
trial, its configuration as the current space's params and distributions and its value the last
value of the task's metric it reported (what Ray's Optuna searcher told its own study then), and
is added to the new study before its first trial. A trial whose configuration is no point of the
current space (the space file was edited since) is skipped; parameters the space no longer has are
left out.
"""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from tune_cells.config import PROMOTION_FIELDS
from tune_cells.logged_runs import LoggedSearch, LoggedTrial
from tune_cells.search_spaces import SearchSpace, point_matches
from tune_cells.tracking import MAX_PARAM_LENGTH, Tracker

log = logging.getLogger(__name__)

WARM_ATTR = "warm_start_from"  # user attribute of a trial given by --warm-start: the search run it came from


@dataclass
class WarmStart:
    trials: list = field(default_factory=list)  # optuna FrozenTrials, oldest first
    searches: int = 0  # earlier searches they came from
    skipped: int = 0  # finished trials of those searches that are no point of the current space
    tried: list[dict] = field(default_factory=list)  # finished earlier trials' configurations (as MLflow logs them)
    # that ran with the space's fixed values as they are now

    def untried(self, points: list[dict]) -> list[dict]:
        """The space's initial points that no earlier finished trial has tried (the earlier searches
        tried them first: again would spend a trial on a known result)."""
        left = [p for p in points if not any(point_matches(p, config) for config in self.tried)]
        if len(left) < len(points):
            log.info("warm start: %d of the space's %d initial points were tried by earlier searches: not again",
                     len(points) - len(left), len(points))
        return left


def earlier_trials(tracker: Tracker, experiment_id: str, space: SearchSpace, task: str, metric: str,
                   mode: str, classes: list[str]) -> WarmStart:
    """The finished trials of the experiment's earlier searches of `task` on `classes` with this space."""
    import optuna

    everything = tracker.runs_of_type(experiment_id, "search")
    alike = [run for run in everything if searched(run) == (task, as_logged(classes))]
    say_what_is_left_out(tracker, experiment_id, everything, alike, task, classes)
    if not alike:  # (said: the search starts cold)
        return WarmStart()
    searches = {run.info.run_id: run for run in alike if Path(LoggedSearch.of(run).space).stem == space.name}
    warm, used = WarmStart(), set()
    for run in tracker.runs_of_type(experiment_id, "trial", finished_only=True) if searches else []:
        search = searches.get(LoggedTrial.of(run).parent_run_id)
        value = run.data.metrics.get(metric)
        if search is None:
            continue
        # what only promotion reads (`ensemble`) never tells trials apart: an earlier trial has the space's value
        params = {**run.data.params, **{k: str(v) for k, v in space.fixed.items() if k in PROMOTION_FIELDS}}
        if not space.fixed or point_matches(space.fixed, params):  # a recipe run under other fixed
            warm.tried.append(params)  # settings (lung before batchnorm_views) was another recipe
        if value is None or not math.isfinite(value):
            continue
        point = space.as_optuna(params)
        if point is None:
            warm.skipped += 1
            continue
        params, distributions = point
        warm.trials.append(optuna.trial.create_trial(
            value=value, params=params, distributions=distributions,
            user_attrs={WARM_ATTR: search.info.run_name, "mlflow_run_id": run.info.run_id}))
        used.add(search.info.run_id)
    warm.searches = len(used)
    if warm.skipped:
        log.warning("warm start: %d finished trial(s) of earlier searches of %s (%s) outside the space now (a value "
                    "beyond its range or choices, or another fixed value): skipped", warm.skipped, task, space.name)
    if not warm.trials:
        log.warning("warm start: no finished trial of an earlier search of %s (%s) to start from: the search starts "
                    "cold", task, space.name)
        return warm
    best = (max if mode == "max" else min)(t.value for t in warm.trials)
    log.info("warm start: %d earlier trials of %s (%s) given to the sampler, best %s %.4f (from %d search%s)",
             len(warm.trials), task, space.name, metric, best, warm.searches, "" if warm.searches == 1 else "es")
    return warm


def searched(run) -> tuple[str, str]:
    """(task, classes as logged: comma-joined, cut to a param's length) of a search run."""
    logged = LoggedSearch.of(run)
    return logged.task, logged.classes


def as_logged(classes: list[str]) -> str:
    return ",".join(classes)[:MAX_PARAM_LENGTH]


def say_what_is_left_out(tracker: Tracker, experiment_id: str, everything: list, alike: list, task: str,
                         classes: list[str]) -> None:
    """One log line for the searches that are left out for their task or classes (all of them: the
    experiment is new, or another task's), so that a mistyped --experiment is seen at once."""
    def shown(task: str, classes: str) -> str:
        return f"{task or '?'} ({textwrap.shorten(classes.replace(',', ', '), 60) or 'no classes logged'})"

    name = tracker.client.get_experiment(experiment_id).name
    others = sorted({shown(*searched(run)) for run in everything} - {shown(task, as_logged(classes))})
    others = "; ".join(others[:3]) + (f"; {len(others) - 3} more" if len(others) > 3 else "")
    if not everything:
        log.warning("warm start: experiment %s has no earlier searches (a new experiment?): the search starts cold",
                    name)
    elif not alike:
        log.warning("warm start: none of the %d earlier searches in experiment %s is of %s: they searched %s; the "
                    "search starts cold", len(everything), name, shown(task, as_logged(classes)), others)
    elif len(alike) < len(everything):
        log.info("warm start: %d earlier search(es) in experiment %s of another task or classes left out: %s",
                 len(everything) - len(alike), name, others)
