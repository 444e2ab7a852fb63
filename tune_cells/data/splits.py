"""Train/validation/test splits: made once per dataset and seed, written to a JSON file, reused.

The file is the source of truth (nnU-Net style): a user may edit it, and later runs use it as
written as long as it still matches the dataset and keeps each group it records in one part.
Related images (near-duplicates; one animal, patient or specimen: `groups`) always share a part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tune_cells.data.class_cover import (
    cover_classes,
    refuse_a_part_without_a_class,
    refuse_classes_in_too_few_groups,
    warn_of_a_part_without_a_class,
)
from tune_cells.data.groups import group_keys, image_groups
from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError
from tune_cells.paths import WorkDir

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
SPLIT_FORMAT = 2  # 2: records `groups`, `excluded` and `grouping`; 1 (before groups): parts only
HELD_OUT_RANK = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Split:
    path: Path
    parts: dict[str, list[str]]  # part -> relative image paths
    seed: int
    header: dict = field(default_factory=dict)  # written with a new file; empty for a loaded one
    groups: dict[str, list[str]] | None = None  # group name -> its images; None: a file from before groups
    excluded: list[dict] = field(default_factory=list)  # in no part: twins of images a layout fixes elsewhere
    grouping: dict = field(default_factory=dict)  # how the groups were formed (counts), as recorded

    @property
    def is_new(self) -> bool:
        return bool(self.header)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def sizes(self) -> dict[str, int]:
        return {part: len(paths) for part, paths in self.parts.items()}

    def units(self, part: str) -> list[str] | None:
        """Each image's bootstrap unit in `part`: its recorded group, else the image itself. None
        where no recorded group has an image in `part`: then images are the units."""
        group_of = {path: name for name, members in (self.groups or {}).items() for path in members}
        paths = self.parts[part]
        if not any(path in group_of for path in paths):
            return None
        return [group_of.get(path, path) for path in paths]


@dataclass(frozen=True)
class DatasetRecord:
    """The data a run used, as MLflow records a dataset input: the images under `uri` as one split
    file divides them (`digest`: the start of the split file's sha256; an external set: of its file list)."""

    name: str
    digest: str
    uri: str
    profile: dict


def dataset_record(index: ImageIndex, split: Split | None = None) -> DatasetRecord:
    """The dataset as `split` divides it, or (None) all of `index` (an external test set)."""
    profile = {"images": len(index.items), "classes": list(index.classes), "source": index.source}
    if split is None:
        return DatasetRecord(index.root.name, index.fingerprint, index.root.resolve().as_uri(), profile)
    profile.update({"split_file": split.path.name, "split_sha256": split.sha256, **split.sizes()})
    return DatasetRecord(f"{index.root.name} (split seed {split.seed})", split.sha256[:12],
                         index.root.resolve().as_uri(), profile)


def split_path(workdir: Path, task: str, index: ImageIndex, seed: int) -> Path:
    return WorkDir.at(workdir).split_file(task, index.fingerprint, seed)


def make_parts(index: ImageIndex, seed: int, groups: list[str | None] | None = None,
               excluded: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Stratified 70/15/15 split, or the dataset's own split where its layout defines one.

    A layout may fix some parts (column `split`); images without one are divided over the
    parts it leaves open, keeping the default proportions between them. `groups` (per image,
    None: related to none) are kept whole; without any group of two or more free images the
    split is the one made before groups existed, image by image. `excluded` images are in no part.
    """
    items = index.items
    fixed = items["split"] if "split" in items.columns else pd.Series([None] * len(items), index=items.index)
    units = pd.Series([g if g is not None else p for g, p in zip(groups or [None] * len(items), items["path"])],
                      index=items.index)
    if excluded:
        kept = ~items["path"].isin(excluded)
        items, fixed = items[kept], fixed[kept]
    parts = {part: sorted(items.loc[fixed == part, "path"]) for part in PARTS}
    open_parts = [part for part in PARTS if not parts[part]]
    free = items[fixed.isna()]
    if free.empty or not open_parts:
        empty = [part for part in PARTS if not parts[part]]
        if empty:  # the layout fixed every image's part and left this one without any
            raise UserInputError(f"{index.root}: the dataset's own split leaves the {empty[0]} part empty")
        return parts
    too_small = [f"{index.classes[label]} ({n})" for label, n in free["label"].value_counts().items() if n < len(open_parts)]
    if too_small:
        raise UserInputError(
            f"{index.root}: classes need at least {len(open_parts)} images (one per split): {', '.join(too_small)}"
        )
    grouped = bool(units[free.index].duplicated().any())
    if grouped:
        refuse_classes_in_too_few_groups(free, units, len(open_parts), index)
    # Carve the open parts off one at a time (test first), each with its exact image count, and
    # each with an image of every class: balanced accuracy and the per-class metrics of a part that
    # lacks a class would silently describe fewer classes.
    total = sum(DEFAULT_FRACTIONS[part] for part in open_parts)
    counts = {part: round(len(free) * DEFAULT_FRACTIONS[part] / total) for part in open_parts[1:]}
    remaining = free
    for offset, part in enumerate(reversed(open_parts[1:])):
        keep = len(open_parts) - 1 - offset  # the parts still to fill from what is not held out
        if grouped:
            held = _group_holdout(remaining, units, counts[part], seed + offset, index, keep)
        else:
            _, held = _stratified(remaining, counts[part], seed + offset, index, keep)
        parts[part] = sorted(held)
        remaining = remaining[~remaining["path"].isin(set(held))]
    parts[open_parts[0]] = sorted(remaining["path"])
    if grouped and not all(parts[part] for part in open_parts):
        raise UserInputError(f"{index.root}: {units[free.index].nunique()} groups of related images are too few "
                             f"to fill {len(open_parts)} parts")
    refuse_a_part_without_a_class(free, units, {part: parts[part] for part in open_parts}, index)
    return parts


def _stratified(items: pd.DataFrame, count: int, seed: int, index: ImageIndex, keep: int = 1):
    labels = items["label"]
    counts = labels.value_counts()
    count = max(count, len(counts))  # room for one image of each class
    # Stratify when every class can be represented on both sides; tiny sets are split plainly.
    feasible = counts.min() >= 2 and min(count, len(items) - count) >= len(counts)
    stratify = labels if feasible else None
    try:
        kept, held = train_test_split(items["path"].tolist(), test_size=count, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise UserInputError(f"{index.root}: too few images to split ({exc})") from None
    held = cover_classes(items, held, keep, seed)
    return sorted(set(items["path"]) - set(held)), held


def _group_holdout(items: pd.DataFrame, units: pd.Series, count: int, seed: int, index: ImageIndex,
                   keep: int = 1) -> list[str]:
    """About `count` of `items` in whole groups, each class in proportion: a stratified group split
    (what StratifiedGroupKFold aims at, with the part's size as the target rather than 1/k). Groups
    in seeded random order (not largest first: that would put every group of two in the first part
    carved and make seeds agree); a group is held out when that brings the held part's class counts
    and its size closer to their targets, and leaves each class in at least `keep` groups for the
    parts still to fill. Then a class the part still lacks gets the group of it that fits best.
    Unlabelled data (one class) is a plain group split."""
    table = pd.crosstab(units[items.index], items["label"])  # group x class image counts
    per_group = table.to_numpy()
    order = np.random.default_rng(seed).permutation(len(table))
    target = per_group.sum(0) * count / len(items)
    groups_left = (per_group > 0).sum(0)  # per class: its groups not held out

    def distance(held: np.ndarray) -> float:  # to the class targets, and to the size (classes' shares round)
        return float(np.abs(held - target).sum() + abs(held.sum() - count))

    def leaves_enough(group) -> bool:
        return bool(np.all(groups_left - (per_group[group] > 0) >= np.minimum(keep, groups_left)))

    held, chosen = np.zeros(per_group.shape[1]), []

    def hold(group) -> None:
        nonlocal held, groups_left
        held, groups_left = held + per_group[group], groups_left - (per_group[group] > 0)
        chosen.append(group)

    for group in order:
        if distance(held + per_group[group]) < distance(held) and leaves_enough(group):
            hold(group)
    for label in np.flatnonzero(held == 0):  # a class the part lacks (its share rounded to none)
        if held[label]:  # held since, with a group taken for another class
            continue
        fitting = [g for g in order if per_group[g, label] and g not in chosen and leaves_enough(g)]
        if fitting:
            hold(min(fitting, key=lambda g: distance(held + per_group[g])))
    if not chosen:  # every group is far larger than the part should be: the smallest one
        chosen = [min(order, key=lambda group: per_group[group].sum())]
    if len(chosen) == len(table):
        raise UserInputError(f"{index.root}: {len(table)} groups of related images are too few to split")
    names = set(table.index[chosen])
    return items.loc[units[items.index].isin(names), "path"].tolist()


def left_out_twins(index: ImageIndex, members: dict[str, list[str]]) -> list[dict]:
    """Images whose group reaches into a part the layout fixes (hep2's validation/ as the test
    part). No image crosses a layout's boundary: the most held-out fixed part keeps its images,
    and their relatives elsewhere are left out of every part."""
    if "split" not in index.items.columns:
        return []
    fixed_of = {path: part for path, part in zip(index.items["path"], index.items["split"]) if part in PARTS}
    out = []
    for name, paths in members.items():
        fixed = {fixed_of[p] for p in paths if p in fixed_of}
        if fixed:
            kept_in = max(fixed, key=HELD_OUT_RANK.__getitem__)
            out += [{"path": p, "group": name, "kept_in": kept_in} for p in paths if fixed_of.get(p) != kept_in]
    return sorted(out, key=lambda entry: entry["path"])


def plan_split(path: Path, index: ImageIndex, seed: int, hashes: np.ndarray | None = None) -> Split:
    """The split in `path` if it exists (checked against the dataset), else a new one, not yet
    written, that keeps groups whole: same group key, and near-duplicates by `hashes` (index order)."""
    path = Path(path)
    if path.exists():
        return _load(path, index, seed)
    groups = image_groups(index, hashes)
    excluded = left_out_twins(index, groups.members)
    parts = make_parts(index, seed, groups.of, frozenset(entry["path"] for entry in excluded))
    grouping = {**groups.summary(), "near_duplicates_checked": hashes is not None,
                "group_key": index.group_source or None, "excluded": len(excluded)}
    header = {"format": SPLIT_FORMAT, "seed": seed, "data_root": str(index.root), "fingerprint": index.fingerprint,
              "classes": index.classes, "grouping": grouping}
    return Split(path=path, parts=parts, seed=seed, header=header, groups=groups.members, excluded=excluded,
                 grouping=grouping)


def save_split(split: Split) -> Split:
    """Write a new split file (atomically: a crash never leaves half a file); keep an existing one."""
    if not split.path.exists():
        split.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = split.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**split.header, **split.parts, "groups": split.groups,
                                   "excluded": split.excluded}, indent=1))
        os.replace(tmp, split.path)
    return split


def load_or_create_split(path: Path, index: ImageIndex, seed: int, hashes: np.ndarray | None = None) -> Split:
    return save_split(plan_split(path, index, seed, hashes))


def _load(path: Path, index: ImageIndex, seed: int) -> Split:
    try:
        payload = json.loads(path.read_text())
        parts = {part: list(payload[part]) for part in PARTS}
        groups = payload.get("groups")
        groups = None if groups is None else {str(name): list(members) for name, members in groups.items()}
        excluded = [dict(entry) if isinstance(entry, dict) else {"path": entry} for entry in payload.get("excluded", [])]
        grouping = dict(payload.get("grouping", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
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
    for name, members in (groups or {}).items():
        unknown = [p for p in members if p not in known]
        if unknown:
            raise UserInputError(f"{path}: group {name} lists {unknown[0]}, which is not in the dataset")
        crossing = _parts_of(members, parts)
        if len(crossing) > 1:
            (a, in_a), (b, in_b) = crossing[:2]
            raise UserInputError(f"{path}: group {name} is in both {a} and {b} ({in_a} in {a}, {in_b} in {b}): "
                                 "related images must share a part; move them into one")
    _warn_of_crossing_keys(path, index, parts, groups is None)
    warn_of_a_part_without_a_class(path, index, parts)
    return Split(path=path, parts=parts, seed=seed, groups=groups, excluded=excluded, grouping=grouping)


def _parts_of(members: list[str], parts: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(part, first member in it) for each part that holds members, train first."""
    return [(part, found[0]) for part in PARTS if (found := sorted(set(members).intersection(parts[part])))]


def _warn_of_crossing_keys(path: Path, index: ImageIndex, parts: dict[str, list[str]], older: bool) -> None:
    """One warning line for a file written before groups, or one that splits a group the dataset's
    key now names (a key added after the split was made)."""
    by_key: dict[str, list[str]] = {}
    for image, key in zip(index.items["path"], group_keys(index)):
        if key is not None:
            by_key.setdefault(key, []).append(image)
    crossing = next(((key, where) for key, members in sorted(by_key.items())
                     if len(where := _parts_of(members, parts)) > 1), None)
    example = f" (group {crossing[0]} is in both {crossing[1][0][0]} and {crossing[1][1][0]})" if crossing else ""
    if older:
        log.warning("%s: a split file from before groups: near-duplicates and images of one animal or patient may "
                    "sit in two parts%s; delete it to split again (the parts will change)", path, example)
    elif crossing:
        log.warning("%s: made without the group key %s%s; delete it to split again (the parts will change)",
                    path, index.group_source or "", example)


def describe_groups(split: Split) -> str:
    """The split's groups in a few words, for the search's log."""
    if split.groups is None:
        return "none recorded (a split file from before groups)"
    grouping = split.grouping
    key = f"key: {grouping['group_key']}; " if grouping.get("group_key") else ""
    merged = (f"near-duplicates within {grouping.get('near_duplicate_bits', '?')} bits merged "
              f"{grouping.get('merged_by_near_duplicates', 0)} groups of {grouping.get('images_in_merged_groups', 0)} "
              "images" if grouping.get("near_duplicates_checked", True) else "near-duplicates not checked")
    return (f"{len(split.groups)} groups of related images, each in one part ({key}{merged}); "
            f"{len(split.excluded)} images left out (twins of images in a part the layout fixes)")


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
