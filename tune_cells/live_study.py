"""The live view of a search: each trial mirrored into an Optuna journal file as it reports, for
`tune-cells dashboard` (optuna-dashboard) to show while the search runs.

Ray's OptunaSearch keeps its study in memory (pickled into Ray's experiment state now and then).
This mirror writes the same trials to a JournalStorage file (append-only, no SQLite locking): one
study per search, named after the search run; a trial's sampled parameters, every epoch's value of
the task's metric as an intermediate value (the learning curves), and its end: COMPLETE with its
last value (what the searcher was told), PRUNED when ASHA stopped it, FAIL. A warm-started search
holds the earlier trials first. It runs on the driver, through the TrialEvents seam. Failing to
write never stops a search: it is said once, and the mirror stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tune_cells.errors import UserInputError, first_line
from tune_cells.logged_runs import STOPPED_BY_TIME_BUDGET
from tune_cells.redact import without_credentials
from tune_cells.search_spaces import SearchSpace

log = logging.getLogger(__name__)

RAY_TRIAL_ATTR = "ray_trial_id"


def open_journal(path: Path):
    """The JournalStorage on `path` (created with its folder if missing). Optuna reads past an
    unreadable last line (an entry a search is writing) but not past one followed by others (a
    write cut short, then more appended): that is a UserInputError naming the file and the line."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError:
        raise
    except Exception as exc:  # JSON or UTF-8 errors, or Optuna's replay failing on an entry it cannot apply
        why = _damage(path) or f"not a journal Optuna can read ({type(exc).__name__}: {first_line(str(exc))})"
        raise UserInputError(f"{path}: {why}") from None


def _damage(path: Path) -> str | None:
    """Where the journal stops being one: its first line that is no journal entry (the last line
    only when it is complete, as Optuna reads it), or None when every line is one."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.endswith(b"\n"):
                return None  # the last line, being written
            try:
                entry = json.loads(line)
            except UnicodeDecodeError:
                return f"line {number} is not text (random bytes?): the journal is damaged"
            except json.JSONDecodeError as exc:
                return (f"line {number} is no journal entry ({exc.msg} at column {exc.colno}): the journal is "
                        "damaged (a write cut short, then more written?)")
            if not isinstance(entry, dict) or "op_code" not in entry:
                return f"line {number} is JSON but no Optuna journal entry: the journal is damaged"
    return None


def drop_unfinished_entry(path: Path) -> None:
    """A search killed while writing an entry leaves it cut short (no newline). Optuna reads past it
    while it is the last line, but a resumed search would append straight after it and make the
    whole journal unreadable. Only the writer calls this: one search per working folder (the lock)."""
    if not path.is_file():
        return
    with path.open("rb+") as journal:
        size = journal.seek(0, os.SEEK_END)
        if size == 0 or (journal.seek(size - 1), journal.read(1))[1] == b"\n":
            return
        keep, end = 0, size
        while end > 0:  # back to the last complete line, a block at a time
            start = max(0, end - (1 << 16))
            journal.seek(start)
            newline = journal.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        journal.truncate(keep)
    log.warning("%s: dropped an unfinished last entry (%d bytes), left by a search stopped while writing it",
                path, size - keep)


@dataclass
class StudyJournal:
    """Ray trial events → trials of one Optuna study in a journal file (TrialEvents protocol)."""

    path: Path
    study_name: str
    space: SearchSpace
    metric: str
    mode: str
    max_epochs: int
    attrs: dict = field(default_factory=dict)  # the study's user attributes (task, experiment, MLflow run)
    warm_trials: list = field(default_factory=list)  # held first (--warm-start)
    run_id_of: Callable[[str], str | None] = lambda trial_id: None  # Ray trial id → its MLflow run id

    def __post_init__(self):
        self._storage = None
        self._study_id = -1
        self._trials: dict[str, int] = {}  # Ray trial id → Optuna trial id
        self._running: set[str] = set()

    def open(self) -> None:
        """Create the study (or find it again, on --resume) before the first trial starts."""
        self._safely(self._open, opening=True)

    def _open(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        drop_unfinished_entry(self.path)
        storage = open_journal(self.path)
        study = optuna.create_study(storage=storage, study_name=self.study_name, load_if_exists=True,
                                    direction="maximize" if self.mode == "max" else "minimize")
        if not study.trials:  # a new search; a resumed one finds its own trials
            for key, value in {**self.attrs, "metric": self.metric, "space": self.space.name,
                               "fixed": self.space.fixed}.items():
                study.set_user_attr(key, value)
            with warnings.catch_warnings():  # (an "experimental" feature since Optuna 3.2)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([self.metric])  # the dashboard's axis names the metric
            study.add_trials(self.warm_trials)
        self._study_id = storage.get_study_id_from_name(self.study_name)
        for trial in study.trials:
            if RAY_TRIAL_ATTR in trial.user_attrs:
                self._trials[trial.user_attrs[RAY_TRIAL_ATTR]] = storage.get_trial_id_from_study_id_trial_number(
                    self._study_id, trial.number)
                if trial.state == optuna.trial.TrialState.RUNNING:
                    self._running.add(trial.user_attrs[RAY_TRIAL_ATTR])
        self._storage = storage
        log.info("live view: study %s in %s (tune-cells dashboard shows it)", self.study_name, self.path)

    def on_trial_start(self, trial_id: str, trial_name: str, config: dict) -> None:
        if trial_id not in self._trials:  # a retried or resumed trial continues its own
            self._safely(lambda: self._start(trial_id, trial_name, config))

    def _start(self, trial_id: str, trial_name: str, config: dict) -> None:
        from optuna.trial import TrialState, create_trial

        attrs = {RAY_TRIAL_ATTR: trial_id, "ray_trial": trial_name, "mlflow_run_id": self.run_id_of(trial_id)}
        template = create_trial(state=TrialState.RUNNING, user_attrs={k: v for k, v in attrs.items() if v is not None})
        optuna_id = self._storage.create_new_trial(self._study_id, template_trial=template)
        # Param by param: an initial point may lie outside its range, which a trial template refuses.
        params, distributions = self.space.as_optuna(config, strict=False) or ({}, {})
        for name, value in params.items():
            distribution = distributions[name]
            self._storage.set_trial_param(optuna_id, name, distribution.to_internal_repr(value), distribution)
        self._trials[trial_id] = optuna_id
        self._running.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value, step = result.get(self.metric), int(result.get("training_iteration", 0))
        if trial_id in self._running and _finite(value):
            self._safely(lambda: self._storage.set_trial_intermediate_value(self._trials[trial_id], step, float(value)))

    def on_trial_end(self, trial_id: str, failed: bool, last_result: dict, error: str | None) -> None:
        if trial_id in self._running:
            self._safely(lambda: self._end(trial_id, failed, last_result, error))

    def _end(self, trial_id: str, failed: bool, last_result: dict, error: str | None) -> None:
        from optuna.trial import TrialState

        value = last_result.get(self.metric)
        optuna_id = self._trials[trial_id]
        if failed or last_result.get("failure") or not _finite(value):
            reason = last_result.get("failure") or error or f"no finite {self.metric}"
            self._storage.set_trial_user_attr(optuna_id, "failure", without_credentials(str(reason))[:500])
            self._storage.set_trial_state_values(optuna_id, TrialState.FAIL)
        elif int(last_result.get("training_iteration", 0)) < self.max_epochs:  # ASHA or --time-budget stopped it
            if last_result.get(STOPPED_BY_TIME_BUDGET):
                self._storage.set_trial_user_attr(optuna_id, STOPPED_BY_TIME_BUDGET, True)
            self._storage.set_trial_state_values(optuna_id, TrialState.PRUNED, [float(value)])
        else:
            self._storage.set_trial_state_values(optuna_id, TrialState.COMPLETE, [float(value)])
        self._running.discard(trial_id)

    def close(self, reason: str = "lost when the search was interrupted") -> None:
        """After the search: a trial still running here was lost in an interruption (started after
        Ray's last state snapshot, so the resumed search never ran it on), or in the search's failure:
        it ends FAIL, as in MLflow."""
        for trial_id in sorted(self._running):
            self.on_trial_end(trial_id, True, {}, reason)

    def _safely(self, action: Callable[[], None], opening: bool = False) -> None:
        if self._storage is None and not opening:
            return  # not opened, or stopped after a failure
        try:
            action()
        except Exception as exc:  # the live view is a convenience: the search goes on without it
            self._storage = None
            log.warning("live view: cannot write %s (%s: %s); the search goes on without it", self.path,
                        type(exc).__name__, exc)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
