"""The searcher side of the Ray adapter: Ray's OptunaSearch with trial configurations in a space's
plain parameter names.

Ray 2.60 makes a define-by-run trial's configuration of every name the function suggested plus the
dict it returned. A per-case alternative is suggested as `lr(sgd)` (its own distribution for TPE)
and returned as `lr`; the typed configurations refuse unknown keys and MLflow logs what Ray gives,
so the Optuna-only names are dropped here, once, for every consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.search.optuna import OptunaSearch


class PlainNamesOptunaSearch(OptunaSearch):
    """OptunaSearch whose suggestions pass through `plain` (a trial configuration -> the same
    without Optuna-only names). Module-level: Ray pickles the searcher with the experiment."""

    def __init__(self, *args: Any, plain: Callable[[dict], dict], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._plain = plain

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        return self._plain(config) if isinstance(config, dict) else config


def searcher_study(experiment_path: str):
    """The Optuna study Ray saved with the experiment (its searcher state file), or None."""
    searcher = OptunaSearch()
    try:
        searcher.restore_from_dir(experiment_path)
    except (FileNotFoundError, RuntimeError):
        return None
    return searcher._ot_study  # no public accessor in Ray 2.60


def searcher_trials(experiment_path: str) -> int:
    """Trials the saved study holds for Ray's trials (not those given to it by --warm-start)."""
    from tune_cells.warm_start import WARM_ATTR

    study = searcher_study(experiment_path)
    return -1 if study is None else sum(WARM_ATTR not in t.user_attrs for t in study.trials)
