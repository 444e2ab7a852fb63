"""Every location inside a working folder, in one place (nnU-Net's `paths.py` idea).

Nothing here touches the disk: a `WorkDir` only names paths; the commands that write create them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tune_cells.errors import UserInputError

DEFAULT_WORKDIR = Path("tune-cells-runs")


def shown_name(path: Path | str) -> str:
    """A path as its bytes read, printable even where they are no UTF-8 (`bad\\xff.png`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_text_name(path: Path) -> Path:
    """A name that is no UTF-8 (Latin-1 bytes from an old share or archive) cannot be written to a
    table, MLflow or a CSV: refused up front, naming it, instead of failing deep in one of them."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"{shown_name(path)}: the name is not UTF-8 text; rename it") from None
    return path


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class WorkDir:
    root: Path  # absolute

    @classmethod
    def at(cls, path: Path | str | WorkDir) -> WorkDir:
        return path if isinstance(path, WorkDir) else cls(Path(path).expanduser().resolve())

    def __fspath__(self) -> str:  # `Path(workdir)` and `open` accept a WorkDir
        return str(self.root)

    @property
    def mlflow_db(self) -> Path:
        """The default MLflow store (sqlite) when no tracking URI is given."""
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        """Artifact root of experiments in a local store."""
        return self.root / "mlartifacts"

    @property
    def lock(self) -> Path:
        """Held by a command that writes (search, evaluate, promote): one writer per folder."""
        return self.root / ".tune-cells.lock"

    def promotion_staging(self, search_run_id: str) -> Path:
        """The best checkpoint of a search while it is being promoted (kept until promotion ends)."""
        return self.root / "promotion" / search_run_id

    @property
    def read_log(self) -> Path:
        """One JSON line per decoded split part: proof that the test part is read only after promotion."""
        return self.root / "read-log.jsonl"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split_file(self, task: str, fingerprint: str, seed: int) -> Path:
        return self.splits / f"{task}-{fingerprint}-{seed}.json"

    def demo_data(self, task: str) -> Path:
        return self.root / "demo-data" / task

    def ray_storage(self, experiment: str) -> Path:
        """Ray Tune's results of an experiment's searches (trial checkpoints, searcher state)."""
        return self.root / "ray" / experiment

    @property
    def optuna_journal(self) -> Path:
        """The live view: every search's trials as an Optuna study (one per search run), written as
        trials report; `tune-cells dashboard` reads it."""
        return self.root / "optuna-journal.log"

    @property
    def seeds_storage(self) -> Path:
        return self.root / "ray" / "seeds"

    def best_config(self, experiment: str, search_run_id: str) -> Path:
        return self.root / "best-configs" / experiment / f"{search_run_id}.yaml"

    def predictions(self, task: str) -> Path:
        return self.root / "predictions" / f"{task}-{_stamp()}.csv"

    def explanations(self, task: str) -> Path:
        return self.root / "explanations" / f"{task}-{_stamp()}"

    def report(self, search_name: str) -> Path:
        return self.root / "reports" / search_name

    def evaluation(self, model_name: str, version: str, run_id: str) -> Path:
        return self.root / "evaluations" / f"{model_name}-v{version}-{run_id[:8]}"


RAM_STAGING = Path("/dev/shm")
RAM_STAGING_MIN_FREE = 2 * 2**30  # leave room for Ray's object store, which lives there too


def checkpoint_staging_dir() -> str | None:
    """Where a trial writes a checkpoint before its session copies it away: memory (/dev/shm) when
    it has room, so a checkpoint is written to disk once (by the copy), not twice; else the system's
    temporary folder (None)."""
    import os
    import shutil

    try:
        if os.access(RAM_STAGING, os.W_OK) and shutil.disk_usage(RAM_STAGING).free >= RAM_STAGING_MIN_FREE:
            return str(RAM_STAGING)
    except OSError:
        pass
    return None
