"""The task registry: a task is declared once here; the CLI, search and evaluation read it.

Adding a task means adding an importer and one `register_task(TaskSpec(...))`; no CLI code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tune_cells.data.images import ImageIndex
from tune_cells.errors import UserInputError
from tune_cells.kinds import CLASSIFICATION, SEGMENTATION, TaskKind


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    layout: str  # the data layout the importer reads, for `tune-cells tasks` and errors
    importer: Callable[[Path], ImageIndex]
    channels: int  # 3 RGB, 1 greyscale
    # Images are decoded once, square, at the dataset's native size (the median longer side, read
    # from headers by the preflight) clamped to [min_store_size, max_store_size]; the arrays stay in
    # memory for the whole search, hence the cap. max_store_size 0: always min_store_size.
    min_store_size: int
    max_store_size: int
    default_space: str  # a file name in search_spaces/, without .yaml
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    kind: TaskKind = CLASSIFICATION
    demo: Callable[..., Path] | None = None  # writes demo data in `layout` into a folder (or `staging=`)
    scans_tree: bool = True  # the importer reads every folder below --data (False: listed files, fixed folders)


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


def registered_name(task: str, demo: bool = False) -> str:
    """The MLflow name of a task's registered model and default experiment (one name for both)."""
    return f"tune-cells-{task}-demo" if demo else f"tune-cells-{task}"


def registered_names(task: str) -> tuple[str, str]:
    """Where a task's champion is looked for: its real-data model first, then its demo model."""
    return registered_name(task), registered_name(task, demo=True)


def _call(module: str, function: str, *args, root: Path, **options):
    return getattr(importlib.import_module(module), function)(root, *args, **options)


def _lazy(module: str, function: str, *args) -> Callable[..., object]:
    """`module.function(root, *args, **options)`, imported only when called: `tune-cells tasks` stays light."""
    return lambda root, **options: _call(module, function, *args, root=root, **options)


_IMPORTERS, _DEMO = "tune_cells.data.importers", "tune_cells.data.demo"
NUCLEI_CLASSES = ["normal_epithelial", "cancer_epithelial", "muscle", "immune"]

register_task(
    TaskSpec(
        name="nuclei",
        description="4-class H&E nucleus patches: normal epithelial, cancer epithelial, muscle, immune",
        layout="train.csv (Filename,Label with labels 0-3) + train/<Filename>, RGB patches",
        importer=_lazy(_IMPORTERS, "import_kaggle_csv", NUCLEI_CLASSES),
        channels=3,
        min_store_size=100,  # the patches' own size
        max_store_size=256,
        default_space="nuclei",
        scans_tree=False,
        demo=_lazy(_DEMO, "generate"),
    )
)
register_task(
    TaskSpec(
        name="leukemia",
        description="ALL-IDB acute lymphoblastic leukemia: lymphoblast vs normal lymphocyte",
        layout="ALL-IDB1 or ALL-IDB2: ImNNN_L.<ext> anywhere below the folder, L=1 blast, L=0 normal "
               "(tif/jpg/png, any case)",
        importer=_lazy(_IMPORTERS, "import_all_idb"),
        channels=3,
        min_store_size=128,  # the size before native decoding: smaller images are still enlarged to it
        max_store_size=256,
        default_space="leukemia",
        demo=_lazy(_DEMO, "generate_all_idb"),
    )
)
register_task(
    TaskSpec(
        name="hep2",
        description="HEp-2 immunofluorescence staining patterns (ICPR 2014), 6 classes, greyscale",
        layout="gt_training.csv ('Image ID,Image class') + NNNNN.png, flat or in training/ validation/ test/ "
               "(all three: the split; training/ + validation/: validation/ is the test part; training/ + test/: test/ is)",
        importer=_lazy(_IMPORTERS, "import_hep2"),
        channels=1,
        min_store_size=78,  # the cells' own size
        max_store_size=256,
        default_space="hep2",
        scans_tree=False,
        demo=_lazy(_DEMO, "generate_hep2"),
    )
)
register_task(
    TaskSpec(
        name="folder",
        description="bring your own classification data: one folder per class",
        layout="<class>/<image> (png, jpg, tif, bmp, any size); classes are the folder names, sorted",
        importer=_lazy(_IMPORTERS, "import_image_folder"),
        channels=3,
        min_store_size=128,  # the size before native decoding: smaller images are still enlarged to it
        max_store_size=256,
        default_space="folder",
        demo=_lazy(_DEMO, "generate_folder", NUCLEI_CLASSES),
    )
)
register_task(
    TaskSpec(
        name="lung",
        description="U-Net segmentation of lung parenchyma and severe inflammation in H&E fields (LungNeuralNet)",
        layout=".../Original/<name>.jpg + one folder of same-name masks per target beside it "
               "(e.g. Parenchyma/, SevereInflammation/; JPEG masks are thresholded at 127, two-level lossless ones "
               "mark the target with their non-zero level)",
        importer=_lazy(_IMPORTERS, "import_lung_masks"),
        channels=3,
        min_store_size=0,  # segmentation keeps each image's own size
        max_store_size=0,
        default_space="lung",
        metric="val_dice",
        kind=SEGMENTATION,
        demo=_lazy(_DEMO, "generate_lung"),
    )
)
