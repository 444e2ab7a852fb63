"""Failpoints for the crash and fault tests: `TUNE_CELLS_FAIL_AT=<point>` makes the named point
fail as the real fault would, through the real code paths (Ray, MLflow, the CLI). Unset, nothing
happens. Points: a promotion step (`measured`, `ensembled`, `staged`, `registered`, `decided`,
`moved`: a SIGKILL, as a power cut), and `diverge:seed<N>` (training under seed N diverges in its
first epoch, as a retrain under an unlucky seed may). Several points: separated by commas."""

from __future__ import annotations

import os
import signal

FAILPOINT_ENV = "TUNE_CELLS_FAIL_AT"


def armed(point: str) -> bool:
    return point in os.environ.get(FAILPOINT_ENV, "").split(",")


def kill_at(step: str) -> None:
    """A crash at `step`: the whole process group when this process leads it (the driver and the
    Ray it started, as a power cut would), else this process alone."""
    if armed(step):
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
