"""Which server files a `path` row may read: only regular files inside the root the server was
given. Every refusal reads the same (missing, a folder, a FIFO or device, outside the root,
unreadable), so a client learns nothing about what exists on the machine."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

PATH_REFUSED = "not an image file this server may read"


class PathRefused(ValueError):
    """A `path` the server will not open; its message is always PATH_REFUSED."""

    def __init__(self):
        super().__init__(PATH_REFUSED)


def allowed_root(folder: Path) -> Path:
    """The root as every path is compared with it: absolute, symlinks resolved."""
    return Path(os.path.realpath(folder))


def open_under_root(value, root: Path) -> BinaryIO:
    """`value` (absolute, or relative to `root`) opened for reading, if it resolves to a regular
    file inside `root` (see allowed_root). Never blocks: the type is checked before opening, and
    the open itself is non-blocking in case the file was swapped for a FIFO in between."""
    if not isinstance(value, str) or not value:
        raise PathRefused()
    try:
        resolved = Path(os.path.realpath(root / value))  # symlinks resolved, so `..` and links cannot leave
        if not resolved.is_relative_to(root) or not stat.S_ISREG(os.stat(resolved).st_mode):
            raise PathRefused()
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise PathRefused() from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise PathRefused()
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
