"""`tune-cells predict`: the registered model's own prediction path, over local files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tune_cells.data.image_refusals import ImageRefused
from tune_cells.data.images import IMAGE_SUFFIXES
from tune_cells.data.importers import hidden_below
from tune_cells.errors import UserInputError
from tune_cells.paths import require_text_name
from tune_cells.tasks import TaskSpec


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, and image files found below folders (sorted, hidden ones skipped); missing
    paths are exit 2."""
    files: list[Path] = []
    for path in map(require_text_name, map(Path, paths)):
        if path.is_dir():
            found = sorted(require_text_name(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and p.is_file() and not hidden_below(p, path))  # as the importers skip them
            if not found:
                raise UserInputError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():  # reading a pipe would wait forever
            raise UserInputError(f"{path}: not a regular file (a pipe, a socket or a device)")
        else:
            raise UserInputError(f"{path}: no such file or folder")
    return files


def predict_files(tracker, model_uri: str, task: TaskSpec, files: list[Path], mask_dir: Path) -> pd.DataFrame:
    """Class probabilities per file; for a segmentation model, the pixel-count table, with masks
    and overlays written to `mask_dir`."""
    tracker.resolve_model(model_uri, task.name)
    predictor = tracker.load_classifier(model_uri)
    images = decode_files(predictor, files)
    table = task.kind.predict_files(predictor, [f.name for f in files], images, mask_dir)
    table.insert(0, "path", [str(f) for f in files])
    return table


def decode_files(predictor, files: list[Path]) -> list:
    """Every file decoded as the model's training data was, before anything is written: one that
    is no image is exit 2 naming it, and no output is left half-written."""
    images = []
    for file in files:
        try:
            images.append(predictor.decode_path(file))
        except ImageRefused as exc:  # its own reason (too many pixels, no finite value)
            raise UserInputError(f"{file}: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserInputError(f"{file}: cannot decode ({type(exc).__name__})") from None
    return images
