"""Ray Tune's driver-side trial events → the project's `TrialEvents` sinks (the MLflow recorder, the
live study), for searches (`ray_backend.run_search`) and retrains (`ray_seeds.run_seeds`) alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from ray import tune

log = logging.getLogger(__name__)


class TrialEvents(Protocol):
    def on_trial_start(self, trial_id: str, trial_name: str, config: dict) -> None: ...
    def on_trial_result(self, trial_id: str, result: dict) -> None: ...
    def on_trial_end(self, trial_id: str, failed: bool, last_result: dict, error: str | None) -> None: ...


@contextmanager
def forwarding_events(name: str, events: TrialEvents | None) -> Iterator[tune.Callback]:
    """The Tune callback forwarding run `name`'s trial events to `events`. Ray pickles callbacks into the
    experiment and restores them on resume: they find the sink by the name. Forgotten afterwards."""
    _EVENT_SINKS[name] = events
    try:
        yield EventsCallback(name)
    finally:
        _EVENT_SINKS.pop(name, None)
        _LIVE.pop(name, None)


def live_trials(name: str) -> set[str]:
    """Trials of run `name` started in this process whose end Ray has not reported."""
    return _LIVE.get(name, set())


def first_error_line(error) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


_EVENT_SINKS: dict[str, TrialEvents | None] = {}
_LIVE: dict[str, set[str]] = {}  # by search: trials started in this process whose end Ray has not reported


class EventsCallback(tune.Callback):
    """Forwards Ray's driver-side trial events to the TrialEvents registered under `key`."""

    def __init__(self, key: str):
        self.key = key

    @property
    def events(self) -> TrialEvents | None:
        return _EVENT_SINKS.get(self.key)

    def on_trial_start(self, iteration, trials, trial, **info):
        _LIVE.setdefault(self.key, set()).add(trial.trial_id)
        if self.events:
            self.events.on_trial_start(trial.trial_id, str(trial), dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.events:
            self.events.on_trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        _LIVE.setdefault(self.key, set()).discard(trial.trial_id)
        if self.events:
            self.events.on_trial_end(trial.trial_id, False, trial.last_result or {}, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.warning("trial %s lost its worker; retrying it from its last checkpoint", trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        _LIVE.setdefault(self.key, set()).discard(trial.trial_id)
        error = None
        if trial.error_file and os.path.exists(trial.error_file):
            error = first_error_line(Path(trial.error_file).read_text())
        if self.events:
            self.events.on_trial_end(trial.trial_id, True, trial.last_result or {}, error)
