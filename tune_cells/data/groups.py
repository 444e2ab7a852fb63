"""Related images, which a split keeps in one part: near-duplicates (the dHash of `images`) and
images that share a group key (one animal, patient or specimen).

A group key is the index's optional `group` column: set by an importer whose layout names one
(lung: the animal in the file name), by `groups.csv` (folder task) or by `--group-pattern`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tune_cells.data.images import NEAR_DUPLICATE_BITS, ImageIndex, near_duplicates
from tune_cells.errors import UserInputError

GROUP_COLUMN = "group"
GROUPS_CSV = "groups.csv"


def group_keys(index: ImageIndex) -> list[str | None]:
    """Each image's group key, None where it has none."""
    if GROUP_COLUMN not in index.items.columns:
        return [None] * len(index.items)
    return [key if isinstance(key, str) and key else None for key in index.items[GROUP_COLUMN]]


def apply_group_pattern(index: ImageIndex, pattern: str) -> None:
    """`--group-pattern`: the group of an image is the first capture group of `pattern` searched in
    its relative path (the whole match without a group); it replaces a layout's own key."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserInputError(f"--group-pattern {pattern!r}: not a regular expression ({exc})") from None
    keys = []
    for path in index.items["path"]:
        match = regex.search(path)
        keys.append(None if match is None else (match.group(1) if regex.groups else match.group(0)) or None)
    if not any(keys):
        raise UserInputError(f"--group-pattern {pattern!r} matches none of the {len(keys)} image paths "
                             f"(e.g. {index.items['path'].iloc[0]}; paths are relative to --data)")
    index.items[GROUP_COLUMN] = keys
    index.group_source = f"--group-pattern {pattern}"


def read_groups_csv(root: Path, paths: list[str]) -> list[str | None] | None:
    """The group of each path from `<root>/groups.csv` (`path,group`, paths relative to the root);
    None without the file. Images it does not list have no group."""
    csv_path = root / GROUPS_CSV
    if not csv_path.is_file():
        return None
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserInputError(f"{csv_path}: not a readable CSV ({exc.__class__.__name__})") from None
    columns = {c.strip().lower(): c for c in table.columns}
    if "path" not in columns or "group" not in columns:
        raise UserInputError(f"{csv_path}: needs columns path,group, found {','.join(table.columns)}")
    # matched in one Unicode form: a CSV typed on Linux (NFC) names files a Mac wrote decomposed (NFD)
    listed = table[columns["path"]].str.strip().str.replace("\\", "/").map(lambda p: unicodedata.normalize("NFC", p))
    known = {unicodedata.normalize("NFC", p) for p in paths}
    unknown = [p for p in listed if p not in known]
    if unknown:
        raise UserInputError(f"{csv_path}: {unknown[0]} is not an image of the dataset (paths are relative to {root})")
    twice = listed[listed.duplicated()].tolist()
    if twice:
        raise UserInputError(f"{csv_path}: {twice[0]} is listed twice")
    group_of = dict(zip(listed, table[columns["group"]].str.strip()))
    return [group_of.get(unicodedata.normalize("NFC", path)) or None for path in paths]


@dataclass
class ImageGroups:
    """Connected components of "same key" and "near-duplicate" links over a dataset's images."""

    of: list[str | None]  # per image (index order): its group's name, None for an image related to none
    members: dict[str, list[str]] = field(default_factory=dict)  # group name -> its image paths
    merged: int = 0  # groups that near-duplicates formed or joined (each of 2+ keys or keyless images)
    merged_images: int = 0  # the images in them

    def summary(self) -> dict:
        return {"groups": len(self.members), "merged_by_near_duplicates": self.merged,
                "images_in_merged_groups": self.merged_images, "near_duplicate_bits": NEAR_DUPLICATE_BITS}


def image_groups(index: ImageIndex, hashes: np.ndarray | None = None) -> ImageGroups:
    """Group every image with those sharing its key and with its near-duplicates (`hashes`, in
    index order; without them, by key only). Transitive: A~B and B~C put A, B, C in one group."""
    paths = list(index.items["path"])
    keys = group_keys(index)
    parent = list(range(len(paths)))

    def root_of(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root_of(i), root_of(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first_with_key: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            join(first_with_key.setdefault(key, i), i)
    if hashes is not None and len(paths) > 1:
        for i, j, _ in near_duplicates(hashes, hashes, upper=True):
            join(i, j)

    components: dict[int, list[int]] = {}
    for i in range(len(paths)):
        components.setdefault(root_of(i), []).append(i)
    groups = ImageGroups(of=[None] * len(paths))
    for rows in components.values():
        units = sorted({keys[i] if keys[i] is not None else paths[i] for i in rows})
        if len(units) == 1 and keys[rows[0]] is None:
            continue  # an image on its own
        if len(units) > 1:
            groups.merged += 1
            groups.merged_images += len(rows)
        name = "+".join(units[:3]) + (f"+{len(units) - 3} more" if len(units) > 3 else "")
        groups.members[name] = sorted(paths[i] for i in rows)
        for i in rows:
            groups.of[i] = name
    return groups
