"""Errors that the CLI turns into exit codes (2: bad input, 1: runtime failure, 128+N: signal N)."""

from __future__ import annotations

import signal


def first_line(message: str) -> str:
    """A message cut to its first non-blank line, " (...)" marking the cut: the contract is one
    line, and a library's message may add SQL, a link or a traceback (-v logs the whole of it)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] + (" (...)" if len(lines) > 1 else "") if lines else ""


class UserInputError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2, no traceback."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal (Ctrl-C, SIGTERM): nothing is promoted, the search can be resumed."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class RetrainFailed(RuntimeError):
    """A retrain of a fixed configuration under another seed (an ensemble's member, `evaluate
    --seeds`) failed, diverged or kept no checkpoint with a finite metric."""

    def __init__(self, seed: int, reason: str):
        super().__init__(f"the retrain under seed {seed} failed: {reason}")
        self.seed = seed


class TrackingLost(RuntimeError):
    """The MLflow tracking server stopped answering (after MLflow's own retries): nothing more can
    be recorded, so the command stops rather than waiting minutes on every further call."""
