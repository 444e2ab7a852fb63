"""K-fold cross-validation inside a search: the train and validation parts pooled and cut into K
folds (stratified by class where there are classes, grouped where images are related), seeded."""

from __future__ import annotations

import numpy as np

from tune_cells.errors import UserInputError


def fold_of(count: int, k: int, seed: int, labels: np.ndarray | None = None,
            groups: np.ndarray | None = None, classes: list[str] | None = None) -> np.ndarray:
    """The fold (0..k-1) of each of `count` pooled images. Every fold must hold an image of every
    class (its model is scored on all of them) and a group is never split: what cannot be cut so is
    one line naming the class (`classes`: the names of the labels) or the group count."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    refuse_too_few(count, k, labels, groups, classes)
    index = np.zeros((count, 1))
    if groups is not None and labels is not None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    elif groups is not None:
        splitter = GroupKFold(n_splits=k)
    elif labels is not None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    assignment = np.empty(count, dtype=np.int64)
    for fold, (_, held) in enumerate(splitter.split(index, labels, groups)):
        assignment[held] = fold
    if labels is not None and groups is not None:  # StratifiedGroupKFold deals groups greedily: no promise
        for label in np.unique(labels):
            lacking = sorted(set(range(k)) - set(assignment[labels == label].tolist()))
            if lacking:
                raise UserInputError(f"--folds {k}: fold {lacking[0] + 1} of the deal gets no image of class "
                                     f"{class_name(label, classes)} (its images lie in "
                                     f"{len(np.unique(groups[labels == label]))} groups of related images, each kept "
                                     "whole in one fold, among groups of other classes): give fewer --folds")
    return assignment


def refuse_too_few(count: int, k: int, labels: np.ndarray | None, groups: np.ndarray | None,
                   classes: list[str] | None) -> None:
    """One line where `k` folds cannot each get an image (a group, with `groups`) of every class."""
    if k > count:
        raise UserInputError(f"--folds {k}: only {count} training and validation images to cut into folds")
    if groups is not None and k > len(np.unique(groups)):
        distinct = len(np.unique(groups))
        raise UserInputError(f"--folds {k}: the training and validation images form only {distinct} groups of "
                             f"related images (a group is never split across folds): give --folds {distinct} or fewer")
    if labels is None:
        return
    for label in np.unique(labels):
        rows = labels == label
        if groups is None and rows.sum() < k:
            raise UserInputError(f"--folds {k}: class {class_name(label, classes)} has only {int(rows.sum())} training and "
                                 "validation images; every fold needs one")
        if groups is not None and len(np.unique(groups[rows])) < k:
            raise UserInputError(f"--folds {k}: class {class_name(label, classes)} has {int(rows.sum())} training and "
                                 f"validation images in {len(np.unique(groups[rows]))} group(s) of related images "
                                 "(a group is never split across folds); every fold needs one of its groups")


def class_name(label, classes: list[str] | None) -> str:
    return str(classes[int(label)]) if classes is not None else str(label)


def pooled_groups(split) -> np.ndarray | None:
    """The group of each pooled train and validation image (related images stay in one fold), or
    None when the split records no groups."""
    train, val = split.units("train"), split.units("val")
    if train is None and val is None:
        return None
    return np.array([*(train or split.parts["train"]), *(val or split.parts["val"])])
