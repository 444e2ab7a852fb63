"""A running search: what it says (a live progress line, why trials wait: Ray Tune callbacks) and
how it stops on a signal. `ray_backend` installs both."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import tune

from tune_cells.data.images import cancel_decoding
from tune_cells.errors import Interrupted

log = logging.getLogger(__name__)


class TimeBudget(tune.stopper.TimeoutStopper):
    """`--time-budget`: Ray's TimeoutStopper (counted from the first step of the trial loop, not
    while a search is interrupted, so a resumed search gets what was left), which also notes when
    it stopped a search, so that the trials it ends are not counted as stopped by ASHA."""

    reached: set[str] = set()  # names of the searches whose budget ran out in this process
    seconds_left: dict[str, float] = {}  # by search: what is left of its budget (a resumed one restores it)

    def __init__(self, seconds: float, key: str):
        super().__init__(seconds)
        self.key = key

    def stop_all(self) -> bool:
        stop = super().stop_all()
        TimeBudget.seconds_left[self.key] = max(0.0, self._budget)
        if stop:
            TimeBudget.reached.add(self.key)
        return stop


class ProgressReporter(tune.Callback):
    """One live line for the whole search, every `every_s` and after each trial: trials done,
    running, pending and stopped early, the best metric so far, and an estimate of time left."""

    def __init__(self, samples: int, max_epochs: int, metric: str, mode: str, every_s: float = 30.0,
                 search: str = ""):
        self.samples, self.max_epochs, self.metric, self.mode, self.every_s = samples, max_epochs, metric, mode, every_s
        self.search = search  # its --time-budget (if any): the estimate never exceeds what is left of it
        self._started = None
        self._last = 0.0

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        self._started = self._started or now
        if now - self._last >= self.every_s:
            self._report(trials, now)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._report(trials, time.monotonic(), trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._report(trials, time.monotonic(), trial)

    def _report(self, trials, now: float, ending=None) -> None:
        """`ending`: the trial whose end triggered this (Ray updates its status after the callbacks)."""
        self._last = now
        started = self._started or now
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is ending]
        running = sum(t.status == "RUNNING" and t is not ending for t in trials)
        failed = sum(t.status == "ERROR" or bool((t.last_result or {}).get("failure")) for t in ended)
        stopped = sum(1 for t in ended if t.status != "ERROR" and not (t.last_result or {}).get("failure")
                      and int((t.last_result or {}).get("training_iteration", 0)) < self.max_epochs)
        values = [t.metric_analysis[self.metric][self.mode] for t in trials if self.metric in t.metric_analysis]
        values = [v for v in values if v == v]  # drop NaN (diverged trials)
        best = (max(values) if self.mode == "max" else min(values)) if values else None
        # Work in trial budgets: an ended trial is one, a running one its share of max_epochs. Pending
        # trials are assumed to run the whole budget (ASHA usually stops them sooner): an upper bound.
        done_work = len(ended) + sum(min(1.0, int((t.last_result or {}).get("training_iteration", 0)) / self.max_epochs)
                                     for t in trials if t.status == "RUNNING" and t is not ending)
        left = (now - started) / done_work * (self.samples - done_work) if done_work > 0 else None
        # (getattr: a reporter restored from a search started before `search` existed has none)
        budget_left = TimeBudget.seconds_left.get(getattr(self, "search", ""))
        if budget_left is not None:
            left = min(left if left is not None else budget_left, budget_left)
        log.info("progress: %d/%d trials done (%d stopped early, %d failed), %d running, %d pending; best %s %s; %s",
                 len(ended), self.samples, stopped, failed, running, max(0, self.samples - len(ended) - running),
                 self.metric, f"{best:.4f}" if best is not None else "-",
                 "done" if len(ended) >= self.samples else
                 f"at most about {max(1, round(left / 60))} min left" if left is not None else "estimating time left")


class PendingTrialsExplainer(tune.Callback):
    """Says in plain words why trials wait, when what they ask for exceeds the whole cluster."""

    def __init__(self, every_s: float = 30.0, check_every_s: float = 5.0):
        self.every_s = every_s
        self.check_every_s = check_every_s
        self._checked = 0.0
        self._last: dict[str, float] = {}

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._checked < self.check_every_s:  # steps come many times a second
            return
        self._checked = now
        pending = [t for t in trials if t.status == "PENDING"]
        if not pending:
            return
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        wants: dict[tuple, int] = {}
        for trial in pending:
            need = trial.placement_group_factory.required_resources
            key = tuple(sorted((k, v) for k, v in need.items() if v))
            wants[key] = wants.get(key, 0) + 1
        for key, count in wants.items():
            if any(all(node.get(k, 0) >= v for k, v in key) for node in nodes):
                continue  # some node can run it: it only waits its turn
            need = ", ".join(f"{v:g} {k}" for k, v in key)
            biggest = ", ".join(f"{max((node.get(k, 0) for node in nodes), default=0):g} {k}" for k, _ in key)
            message = (f"{count} trial{'s' if count > 1 else ''} pending: each needs {need} on one node, "
                       f"the largest node has {biggest} (an autoscaling cluster may still add nodes)")
            if now - self._last.get(message, -1e9) >= self.every_s:
                self._last[message] = now
                log.warning(message)


@contextmanager
def stop_on_signals(then: str = "continue it later with --resume") -> Iterator[None]:
    """Ctrl-C or SIGTERM while trials run: Tune stops and saves its state one last time (its own
    SIGUSR1 path), and the search then ends as interrupted (resumable), never as finished.

    Tune's own Ctrl-C handler stops the same way but lets `fit()` return as if the search had
    finished, and SIGTERM would end the driver without saving (Ray's handler exits at once). A
    second signal stops at once.
    """
    received: list[int] = []

    def stop(signum, frame):
        if received or signal.getsignal(signal.SIGUSR1) is placeholder:  # again, or before Tune listens
            raise Interrupted(signum)
        received.append(signum)
        log.warning("%s received: stopping the trials and saving their state (again: stop at once); %s",
                    signal.Signals(signum).name, then)
        os.kill(os.getpid(), signal.SIGUSR1)

    def placeholder(signum, frame):  # until Tune installs its SIGUSR1 handler
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGUSR1, placeholder)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env
    if received:
        raise Interrupted(received[0])


@contextmanager
def signals_cancel_decoding() -> Iterator[None]:
    """Ctrl-C or SIGTERM while Ray starts beside the decoding: cancel the decoding in the handler
    itself, then raise. Cancelling only where the KeyboardInterrupt arrives relied on it reaching
    us out of Ray's start, and in full test runs here the search waited for the whole pass now and
    then (not found why); with the pass cancelled first, an exception lost or replaced on the way
    still ends the search as interrupted (exit 128+N) in moments, opening no store. The handlers
    before it come back after it, SIGTERM's too (Ray's start sets one that exits 15 without saying
    the search was interrupted)."""
    received: list[int] = []

    def stop(signum, frame):
        cancel_decoding()
        received.append(signum)
        raise Interrupted(signum)

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, stop)
    try:
        yield
    except BaseException as exc:
        if received and not isinstance(exc, Interrupted):  # DecodingCancelled, or what Ray's start made of it
            raise Interrupted(received[0]) from None
        raise
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if received:  # the signal's exception was swallowed on the way: the search still stops here
        raise Interrupted(received[0])
