"""Train/validation/test splits: made once per dataset and seed, written to a JSON file, reused.

The file is the source of truth (nnU-Net style): a user may edit it, and later runs use it as
written as long as it still matches the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError
from tune_cells.paths import WorkDir

PARTS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class Split:
    path: Path
    parts: dict[str, list[str]]  # part -> relative image paths
    seed: int
    header: dict = field(default_factory=dict)  # written with a new file; empty for a loaded one

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def sizes(self) -> dict[str, int]:
        return {part: len(paths) for part, paths in self.parts.items()}


def split_path(workdir: Path, task: str, index: ImageIndex, seed: int) -> Path:
    return WorkDir.at(workdir).split_file(task, index.fingerprint, seed)


def make_parts(index: ImageIndex, seed: int) -> dict[str, list[str]]:
    """Stratified 70/15/15 split, or the dataset's own split where its layout defines one.

    A layout may fix some parts (column `split`); images without one are divided over the
    parts it leaves open, keeping the default proportions between them.
    """
    items = index.items
    fixed = items["split"] if "split" in items.columns else pd.Series([None] * len(items), index=items.index)
    parts = {part: sorted(items.loc[fixed == part, "path"]) for part in PARTS}
    open_parts = [part for part in PARTS if not parts[part]]
    free = items[fixed.isna()]
    if free.empty or not open_parts:
        return parts
    too_small = [f"{index.classes[label]} ({n})" for label, n in free["label"].value_counts().items() if n < len(open_parts)]
    if too_small:
        raise UserInputError(
            f"{index.root}: classes need at least {len(open_parts)} images (one per split): {', '.join(too_small)}"
        )
    # Carve the open parts off one at a time (test first), each with its exact image count.
    total = sum(DEFAULT_FRACTIONS[part] for part in open_parts)
    counts = {part: round(len(free) * DEFAULT_FRACTIONS[part] / total) for part in open_parts[1:]}
    remaining = free
    for offset, part in enumerate(reversed(open_parts[1:])):
        kept, held = _stratified(remaining, counts[part], seed + offset, index)
        parts[part] = sorted(held)
        remaining = remaining[remaining["path"].isin(set(kept))]
    parts[open_parts[0]] = sorted(remaining["path"])
    return parts


def _stratified(items: pd.DataFrame, count: int, seed: int, index: ImageIndex):
    labels = items["label"]
    counts = labels.value_counts()
    # Stratify when every class can be represented on both sides; tiny sets are split plainly.
    feasible = counts.min() >= 2 and min(count, len(items) - count) >= len(counts)
    stratify = labels if feasible else None
    try:
        kept, held = train_test_split(items["path"].tolist(), test_size=count, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise UserInputError(f"{index.root}: too few images to split ({exc})") from None
    return kept, held


def plan_split(path: Path, index: ImageIndex, seed: int) -> Split:
    """The split in `path` if it exists (checked against the dataset), else a new one, not yet written."""
    path = Path(path)
    if path.exists():
        return _load(path, index, seed)
    header = {"format": 1, "seed": seed, "data_root": str(index.root), "fingerprint": index.fingerprint,
              "classes": index.classes}
    return Split(path=path, parts=make_parts(index, seed), seed=seed, header=header)


def save_split(split: Split) -> Split:
    """Write a new split file (atomically: a crash never leaves half a file); keep an existing one."""
    if not split.path.exists():
        split.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = split.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**split.header, **split.parts}, indent=1))
        os.replace(tmp, split.path)
    return split


def load_or_create_split(path: Path, index: ImageIndex, seed: int) -> Split:
    return save_split(plan_split(path, index, seed))


def _load(path: Path, index: ImageIndex, seed: int) -> Split:
    try:
        payload = json.loads(path.read_text())
        parts = {part: list(payload[part]) for part in PARTS}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{path}: not a valid split file ({exc.__class__.__name__}: {exc})") from None
    known = set(index.items["path"])
    seen: set[str] = set()
    for part in PARTS:
        unknown = [p for p in parts[part] if p not in known]
        if unknown:
            raise UserInputError(f"{path}: {part} lists {unknown[0]}, which is not in the dataset")
        overlap = seen.intersection(parts[part])
        if overlap:
            raise UserInputError(f"{path}: {sorted(overlap)[0]} is in more than one split")
        if not parts[part]:
            raise UserInputError(f"{path}: the {part} split is empty")
        seen.update(parts[part])
    return Split(path=path, parts=parts, seed=seed)


def cross_split_duplicates(split: Split, paths: list[str], hashes) -> list[dict]:
    """Near-identical images in two different parts (train/val, train/test, val/test)."""
    from tune_cells.data.images import near_duplicates

    row = {path: i for i, path in enumerate(paths)}
    found = []
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        rows_a = [row[p] for p in split.parts[a]]
        rows_b = [row[p] for p in split.parts[b]]
        for i, j, bits in near_duplicates(hashes[rows_a], hashes[rows_b]):
            found.append({"part_a": a, "path_a": split.parts[a][i], "part_b": b, "path_b": split.parts[b][j],
                          "differing_bits": bits})
    return found
