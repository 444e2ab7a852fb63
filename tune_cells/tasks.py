"""The task registry: a task is declared once here; the CLI, search and evaluation read it.

Adding a task means adding an importer and one `register_task(TaskSpec(...))`; no CLI code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    layout: str  # the data layout the importer reads, for `tune-cells tasks` and errors
    importer: Callable[[Path], ImageIndex]
    channels: int  # 3 RGB, 1 greyscale
    store_size: int  # images are decoded once to this square size
    default_space: str  # a file name in search_spaces/, without .yaml
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    kind: str = "classification"
    demo: Callable[[Path], Path] | None = None  # writes demo data in `layout` into a folder


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    _TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    if name not in _TASKS:
        raise UserInputError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    return _TASKS[name]


def task_names() -> list[str]:
    return sorted(_TASKS)


def _nuclei_importer(root: Path) -> ImageIndex:
    from tune_cells.data.importers import import_kaggle_csv

    return import_kaggle_csv(root, NUCLEI_CLASSES)


def _nuclei_demo(root: Path) -> Path:
    from tune_cells.data.demo import generate

    return generate(root)


NUCLEI_CLASSES = ["normal_epithelial", "cancer_epithelial", "muscle", "immune"]

register_task(
    TaskSpec(
        name="nuclei",
        description="4-class H&E nucleus patches: normal epithelial, cancer epithelial, muscle, immune",
        layout="train.csv (Filename,Label with labels 0-3) + train/<Filename>, RGB patches",
        importer=_nuclei_importer,
        channels=3,
        store_size=100,
        default_space="nuclei",
        demo=_nuclei_demo,
    )
)
