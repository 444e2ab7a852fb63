"""Decodes the images of one split part, and logs every read.

The read log is how the project proves that the test part is not touched before promotion:
each call appends one JSON line (part, purpose, image count, time) to the workdir's read log
(`WorkDir.read_log`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from tune_cells.data.images import DECODE_ERRORS, ImageIndex, decode_full, decode_images, decode_mask
from tune_cells.data.splits import Split
from tune_cells.errors import UserInputError
from tune_cells.paths import WorkDir


class SplitReader:
    def __init__(self, index: ImageIndex, split: Split, channels: int, size: int, workdir: Path,
                 decoded: dict[str, np.ndarray] | None = None):
        """`decoded`: pixels the preflight already decoded (by path), used instead of decoding
        again; each is handed over once and then dropped."""
        self.index = index
        self._decoded = decoded if decoded is not None else {}
        self.split = split
        self.channels = channels
        self.size = size
        self.read_log = WorkDir.at(workdir).read_log
        self._labels = dict(zip(index.items["path"], index.items["label"]))

    def load(self, part: str, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (images uint8 N×H×W×C, labels int64) of one split part."""
        paths = self.split.parts[part]
        if paths and all(p in self._decoded for p in paths):
            images = np.stack([self._decoded.pop(p) for p in paths])
        else:
            images = decode_images(self.index.root, paths, self.channels, self.size)
        labels = np.array([self._labels[p] for p in paths], dtype=np.int64)
        self._log(part, purpose, len(paths))
        return images, labels

    def load_segmentation(self, part: str, purpose: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Return full-size images (uint8 H×W×3) and their masks (uint8 0/1 T×H×W) of one part."""
        rows = self.index.items.set_index("path")
        images, masks = [], []
        for path in self.split.parts[part]:
            try:
                images.append(self._take(path, decode_full))
                masks.append(np.stack([self._take(rows.at[path, f"mask:{t}"], decode_mask)
                                       for t in self.index.classes]))
            except DECODE_ERRORS as exc:
                raise UserInputError(f"{self.index.root / path}: cannot decode it or its masks "
                                     f"({type(exc).__name__})") from None
        self._log(part, purpose, len(images))
        return images, masks

    def _take(self, path: str, decode) -> np.ndarray:
        found = self._decoded.pop(path, None)
        return found if found is not None else decode(self.index.root / path)

    def _log(self, part: str, purpose: str, count: int) -> None:
        entry = {
            "time": time.time(),
            "split_file": self.split.path.name,
            "part": part,
            "purpose": purpose,
            "images": count,
            "pid": os.getpid(),
        }
        self.read_log.parent.mkdir(parents=True, exist_ok=True)
        with self.read_log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def read_log_entries(workdir: Path) -> list[dict]:
    path = WorkDir.at(workdir).read_log
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
