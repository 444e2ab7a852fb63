"""Every part of a split holds an image of every class: balanced accuracy and the per-class
metrics of a part that lacks one would silently describe fewer classes. A stratified split rounds
a small class's share of a part to none, so the parts are mended here; where groups of related
images (never split) make that impossible, one line names the class."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError

log = logging.getLogger(__name__)


def cover_classes(items: pd.DataFrame, held: list[str], keep: int, seed: int) -> list[str]:
    """`held` changed as little as may be so that it has an image of every class of `items` and
    leaves at least `keep` of each for the parts still to fill (each class has `keep` + 1): a
    stratified split rounds a small class's share to none (3 images of 303 get 0.45 of a 15% part).
    An image moved in is paid for by one of the class furthest above its share, and one moved out
    by one of the class furthest below, so the part keeps its size."""
    rng = np.random.default_rng(seed)
    totals = items["label"].value_counts()
    share = totals * len(held) / len(items)
    held = set(held)
    inside = Counter(items.loc[items["path"].isin(held), "label"])

    def move(cls, into: bool) -> None:  # one image of `cls`, chosen by the seed, into or out of the part
        pool = sorted(p for p in items.loc[items["label"] == cls, "path"] if (p in held) != into)
        path = pool[rng.integers(len(pool))]
        if into:
            held.add(path)
        else:
            held.discard(path)
        inside[cls] += 1 if into else -1

    for cls in sorted(totals.index):
        if not inside[cls]:
            move(cls, True)
            surplus = [(inside[c] - share[c], c) for c in totals.index if c != cls and inside[c] > 1]
            if surplus:
                move(max(surplus)[1], False)
        while totals[cls] - inside[cls] < keep:
            move(cls, False)
            deficit = [(share[c] - inside[c], c) for c in totals.index if c != cls and totals[c] - inside[c] > keep]
            if deficit:
                move(max(deficit)[1], True)
    return sorted(held)


def refuse_classes_in_too_few_groups(free: pd.DataFrame, units: pd.Series, parts: int, index: ImageIndex) -> None:
    """Every part needs an image of every class, and a group is never split: a class whose images
    lie in fewer groups than there are parts cannot be in each (one line naming it), and neither
    can any class when the groups are fewer than the parts."""
    groups = units[free.index]
    if groups.nunique() < parts:
        raise UserInputError(f"{index.root}: {groups.nunique()} groups of related images are too few to fill "
                             f"{parts} parts")
    for label, count in sorted(groups.groupby(free["label"]).nunique().items()):
        if count < parts:
            images = int((free["label"] == label).sum())
            raise UserInputError(f"{index.root}: class {index.classes[label]} has {images} images in {count} "
                                 f"group(s) of related images (one animal, patient or near-duplicate set each, "
                                 f"never split): each of the {parts} parts needs one of its groups")


def refuse_a_part_without_a_class(free: pd.DataFrame, units: pd.Series, parts: dict[str, list[str]],
                                   index: ImageIndex) -> None:
    """The last word: a part dealt without a class of the dataset is refused (one line naming it),
    never trained and scored as if the class were not there. Groups shared by several classes can
    leave no way to give each part each class without splitting a group."""
    label = dict(zip(free["path"], free["label"]))
    for part, paths in parts.items():
        missing = sorted(set(free["label"]) - {label[p] for p in paths})
        if missing:
            cls = missing[0]
            rows = free["label"] == cls
            raise UserInputError(f"{index.root}: class {index.classes[cls]} ({int(rows.sum())} images in "
                                 f"{units[free.index][rows].nunique()} group(s) of related images) cannot be given to "
                                 f"the {part} part without splitting a group: add images of it from other groups")


def warn_of_a_part_without_a_class(path: Path, index: ImageIndex, parts: dict[str, list[str]]) -> None:
    """One warning line for a split file (made before every part got every class, or edited) whose
    part lacks a class: it is still used as written, but its metrics describe fewer classes."""
    label = dict(zip(index.items["path"], index.items["label"]))
    classes = {label[p] for paths in parts.values() for p in paths}
    for part, paths in parts.items():
        missing = sorted(classes - {label[p] for p in paths})
        if missing:
            log.warning("%s: the %s part has no image of class %s: its metrics leave that class out; delete the file "
                        "to split again (the parts will change)", path, part, index.classes[missing[0]])
            return
