"""Importers: read a dataset folder in its original layout into an ImageIndex.

Every importer checks what it can without decoding pixels (files present, labels known,
classes non-empty) and raises UserInputError naming the culprit.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError


def _name_some(values: list, limit: int = 3) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def require_dir(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserInputError(f"--data {root}: no such folder")
    return root.resolve()


def import_kaggle_csv(root: Path, classes: list[str]) -> ImageIndex:
    """Kaggle layout: `train.csv` (Filename,Label with integer labels) and `train/<Filename>`."""
    root = require_dir(root)
    csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise UserInputError(f"{csv_path}: missing (expected train.csv with Filename,Label and train/<file>)")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserInputError(f"{csv_path}: not a readable CSV ({exc.__class__.__name__})") from None
    columns = {c.strip().lower(): c for c in table.columns}
    if "filename" not in columns or "label" not in columns:
        raise UserInputError(f"{csv_path}: needs columns Filename,Label, found {','.join(table.columns)}")
    names = table[columns["filename"]].str.strip()
    raw_labels = table[columns["label"]].str.strip()
    if names.empty:
        raise UserInputError(f"{csv_path}: no rows")

    known = {str(i): i for i in range(len(classes))}
    unknown = sorted(set(raw_labels) - set(known))
    if unknown:
        raise UserInputError(
            f"{csv_path}: unknown label {_name_some(unknown)} (expected 0..{len(classes) - 1})"
        )
    duplicated = names[names.duplicated()].tolist()
    if duplicated:
        raise UserInputError(f"{csv_path}: file listed twice: {_name_some(duplicated)}")

    paths = [f"train/{name}" for name in names]
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise UserInputError(f"{csv_path}: rows without their file: {_name_some(missing)}")
    items = pd.DataFrame({"path": paths, "label": raw_labels.map(known).astype(int)})
    index = ImageIndex(root=root, items=items, classes=list(classes))
    empty = [name for name, n in index.class_counts().items() if n == 0]
    if empty:
        raise UserInputError(f"{csv_path}: no images of class {_name_some(empty)}")
    return index
