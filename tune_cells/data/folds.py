"""K-fold cross-validation inside a search: the train and validation parts pooled and cut into K
folds (stratified by class where there are classes, grouped where images are related), seeded."""

from __future__ import annotations

import numpy as np

from tune_cells.errors import UserInputError


def fold_of(count: int, k: int, seed: int, labels: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..k-1) of each of `count` pooled images."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if k > count:
        raise UserInputError(f"--folds {k}: only {count} training and validation images to cut into folds")
    if labels is not None and np.bincount(labels).min(initial=count) < k:
        smallest = int(np.bincount(labels)[np.bincount(labels) > 0].min())
        raise UserInputError(f"--folds {k}: a class has only {smallest} training and validation images; "
                             f"every fold needs one")
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
    return assignment


def pooled_groups(split) -> np.ndarray | None:
    """The group of each pooled train and validation image (related images stay in one fold), or
    None when the split records no groups."""
    train, val = split.units("train"), split.units("val")
    if train is None and val is None:
        return None
    return np.array([*(train or split.parts["train"]), *(val or split.parts["val"])])
