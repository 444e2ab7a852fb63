"""One writer per working folder: `search`, `evaluate` and `promote` hold an exclusive lock; a
second writer is refused at once, naming the holder. Read-only commands take none.

An flock on a file in the folder: the kernel releases it when its holder dies, so a kill -9 never
leaves a stale lock. The file is removed on release, so the folder holds only what it held before.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.paths import WorkDir


class WorkdirLock:
    def __init__(self, workdir: WorkDir, command: str):
        self.workdir = workdir
        self.command = command
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> WorkdirLock:
        if not self.workdir.root.exists():
            self.workdir.root.mkdir(parents=True)
            self._created_folder = True  # removed again if nothing else was written
        path = self.workdir.lock
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                self._forget_folder()
                raise UserInputError(f"--workdir {self.workdir.root} is in use by another tune-cells command "
                                     f"({holder}); wait for it to end, or stop it") from None
            # The holder before us may have removed the file between our open and our lock: then
            # we hold a lock on a file nobody else can see, so try again on the current one.
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: tune-cells {self.command}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.workdir.lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        if self._created_folder and not any(self.workdir.root.iterdir()):
            self.workdir.root.rmdir()


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
