"""Importers: read a dataset folder in its original layout into an ImageIndex.

Every importer checks what it can without decoding pixels (files present, labels known,
classes non-empty) and raises UserInputError naming the culprit.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import pandas as pd

from tune_cells.data.groups import GROUP_COLUMN, GROUPS_CSV, read_groups_csv
from tune_cells.data.images import DECODE_ERRORS, IMAGE_SUFFIXES, ImageIndex
from tune_cells.errors import UserInputError
from tune_cells.paths import require_text_name

log = logging.getLogger(__name__)


def _name_some(values: list, limit: int = 3) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def require_dir(root: Path) -> Path:
    root = require_text_name(Path(root).expanduser())
    if root.exists() and not root.is_dir():
        raise UserInputError(f"--data {root}: a file; give the dataset's folder")
    if not root.is_dir():
        raise UserInputError(f"--data {root}: no such folder")
    return root.resolve()


def class_name(name: str) -> str:
    """A class or target name as recorded and matched: NFC. macOS stores a folder name decomposed
    (NFD: 'e' + a combining accent) where Linux keeps the typed, composed form, so one 'café' can be
    two strings; a model trained on one must know the other."""
    return unicodedata.normalize("NFC", name)


def class_folders(root: Path, folders) -> list[Path]:
    """`folders` in the order of their class names (NFC); two that are one name in two Unicode
    forms are refused, naming both: whichever was kept, the other's images would be mislabelled."""
    by_name: dict[str, Path] = {}
    for folder in map(require_text_name, folders):
        other = by_name.setdefault(class_name(folder.name), folder)
        if other != folder:
            first, second = sorted([other.name, folder.name])
            raise UserInputError(f"{root}: folders {ascii(first)} and {ascii(second)} are one name, "
                                 f"{class_name(folder.name)}, in two Unicode forms (NFC and NFD, as macOS writes "
                                 "it): merge them into one folder")
    return [by_name[name] for name in sorted(by_name)]


def _read_label_csv(csv_path: Path, columns: tuple[str, str], expected: str) -> tuple[pd.Series, pd.Series]:
    """The two named columns of a label CSV as stripped strings (names matched case-insensitively)."""
    if not csv_path.is_file():
        raise UserInputError(f"{csv_path}: missing (expected {expected})")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserInputError(f"{csv_path}: not a readable CSV ({exc.__class__.__name__})") from None
    found = {c.strip().lower(): c for c in table.columns}
    if any(name.lower() not in found for name in columns):
        raise UserInputError(f"{csv_path}: needs columns {','.join(columns)}, found {','.join(table.columns)}")
    first, second = (table[found[name.lower()]].str.strip() for name in columns)
    return first, second


def import_kaggle_csv(root: Path, classes: list[str]) -> ImageIndex:
    """Kaggle layout: `train.csv` (Filename,Label with integer labels) and `train/<Filename>`."""
    root = require_dir(root)
    csv_path = root / "train.csv"
    names, raw_labels = _read_label_csv(csv_path, ("Filename", "Label"), "train.csv with Filename,Label and train/<file>")
    if names.empty:
        raise UserInputError(f"{csv_path}: no rows")

    known = {str(i): i for i in range(len(classes))}
    bad = ~raw_labels.isin(list(known))
    if bad.any():  # named by its row and file, quoted: an empty label would show as nothing
        row = int(bad.to_numpy().argmax())
        others = int(bad.sum()) - 1
        more = f"; {others} more such row{'s' if others > 1 else ''}" if others else ""
        raise UserInputError(f"{csv_path}: row {row + 1} ({names.iloc[row]!r}): label {raw_labels.iloc[row]!r} is not "
                             f"one of 0..{len(classes) - 1}{more}")
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


# Operating-system litter that may sit beside images; anything else that is not an image is an error.
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


def hidden_below(path: Path, folder: Path) -> bool:
    """Whether `path` is a hidden file or lies in a hidden folder below `folder` (a Mac's ._cell.png,
    .thumbs/, .ipynb_checkpoints/): not the user's images, wherever a folder is searched for them."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _listed(root: Path, folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) below `folder`, as sorted POSIX paths relative to `root`. Hidden
    files and everything in hidden folders (.thumbs/, .ipynb_checkpoints/) are not the dataset's."""
    images, others = [], []
    for path in sorted(folder.rglob("*")):
        if hidden_below(path, folder) or path.is_dir() \
                or path.name.lower() in _IGNORED_FILES:
            continue
        if not path.is_file():  # a broken link, a pipe (reading it would wait forever), a device
            raise UserInputError(f"{path}: not a regular file (a broken link, a pipe or a device)")
        require_text_name(path)
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path.relative_to(root).as_posix())
    return images, others


def import_image_folder(root: Path) -> ImageIndex:
    """Bring-your-own layout `<root>/<class>/<image>`; classes are the folder names, sorted. An
    optional `<root>/groups.csv` (path,group) names related images, which share a split part."""
    root = require_dir(root)
    class_dirs = class_folders(root, (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if loose:  # they would silently be no class's images
        raise UserInputError(f"{root}: images outside the class folders: {_name_some(loose)} (expected <class>/<image>)")
    if len(class_dirs) < 2:
        raise UserInputError(f"{root}: expected one folder per class (<class>/<image>), found {len(class_dirs)}")
    paths, labels, strays = [], [], []
    for label, folder in enumerate(class_dirs):
        images, others = _listed(root, folder)
        paths += images
        labels += [label] * len(images)
        strays += others
    if strays:
        raise UserInputError(f"{root}: not image files ({', '.join(sorted(IMAGE_SUFFIXES))}): {_name_some(strays)}")
    index = ImageIndex(root=root, items=pd.DataFrame({"path": paths, "label": labels}),
                       classes=[class_name(d.name) for d in class_dirs])
    groups = read_groups_csv(root, paths)
    if groups is not None:
        index.items[GROUP_COLUMN] = groups
        index.group_source = GROUPS_CSV
    empty = [name for name, n in index.class_counts().items() if n == 0]
    if empty:
        raise UserInputError(f"{root}: no images in class folder {_name_some(empty)}")
    return index


_ALL_IDB_NAME = re.compile(r"^im(\d+)_([01])$", re.IGNORECASE)


def import_all_idb(root: Path) -> ImageIndex:
    """ALL-IDB1 or ALL-IDB2: `ImNNN_L.<ext>` anywhere below `root`, L=1 blast, L=0 normal."""
    root = require_dir(root)
    images, _ = _listed(root, root)  # ALL-IDB1's .xyc coordinate files are not images: skipped
    if not images:
        raise UserInputError(f"{root}: no images named ImNNN_L.<ext> (ALL-IDB layout)")
    versions = {part for p in images for part in p.split("/")[:-1] if part.upper() in ("ALL_IDB1", "ALL_IDB2")}
    if len(versions) > 1:
        raise UserInputError(f"{root}: holds both ALL_IDB1 and ALL_IDB2: point --data at one of them")
    named = [(p, _ALL_IDB_NAME.match(Path(p).stem)) for p in images]
    unnamed = [p for p, match in named if match is None]
    if unnamed:
        raise UserInputError(f"{root}: not named ImNNN_L (L=0 normal, 1 blast): {_name_some(unnamed)}")
    stems = pd.Series([Path(p).stem.lower() for p in images])
    twice = sorted(set(stems[stems.duplicated()]))
    if twice:  # two files of one name: two extensions, or a copy in another folder
        both = [p for p in images if Path(p).stem.lower() == twice[0]]
        raise UserInputError(f"{root}: image {Path(both[0]).stem} is there twice: {both[0]} and {both[1]}")
    items = pd.DataFrame({"path": images, "label": [int(match.group(2)) for _, match in named]})
    index = ImageIndex(root=root, items=items, classes=["normal", "blast"])
    empty = [name for name, n in index.class_counts().items() if n == 0]
    if empty:
        raise UserInputError(f"{root}: no images of class {_name_some(empty)}")
    return index


HEP2_CLASSES = ["Homogeneous", "Speckled", "Nucleolar", "Centromere", "NuMem", "Golgi"]
_HEP2_FOLDERS = ("training", "validation", "test")


def import_hep2(root: Path) -> ImageIndex:
    """ICPR 2014 HEp-2 cells: `gt_training.csv` ("Image ID,Image class", IDs without zero padding)
    and `NNNNN.png` images, flat or in training/ validation/ test/ folders.

    All three folders: they are the split. training/ and validation/ only: validation/ is the test
    part (the contest's use of it) and validation is carved from training/. training/ and test/:
    test/ is the test part, validation is carved from training/. Flat: split as usual. A folder
    none of whose images is in the CSV (the contest's unlabelled test/) is not used, and said so.
    """
    root = require_dir(root)
    csv_path = root / "gt_training.csv"
    ids, names = _read_label_csv(csv_path, ("Image ID", "Image class"), "gt_training.csv with 'Image ID,Image class'")
    folders = [name for name in _HEP2_FOLDERS if (root / name).is_dir()]
    files: dict[int, tuple[str, str | None]] = {}  # image id -> (relative path, folder)
    for folder in folders or [None]:
        base = root / folder if folder else root
        for path in sorted(base.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and _is_ascii_number(path.stem):
                number = int(path.stem)
                if number in files:
                    raise UserInputError(f"{root}: image {number} is in both {files[number][0]} and {path.relative_to(root)}")
                files[number] = (path.relative_to(root).as_posix(), folder)
    classes = {name.lower(): i for i, name in enumerate(HEP2_CLASSES)}
    bad_ids = [v for v in ids if not _is_ascii_number(v)]
    if bad_ids:
        raise UserInputError(f"{csv_path}: Image ID must be a number (digits 0-9): {_name_some(bad_ids)}")
    numbers = ids.map(int)
    if numbers.duplicated().any():
        raise UserInputError(f"{csv_path}: Image ID listed twice: {_name_some(sorted(set(numbers[numbers.duplicated()])))}")
    unknown = sorted({n for n in names if n.lower() not in classes})
    if unknown:
        raise UserInputError(f"{csv_path}: unknown class {_name_some(unknown)} (expected {', '.join(HEP2_CLASSES)})")
    missing = [v for v in ids if int(v) not in files]
    if missing:
        raise UserInputError(f"{csv_path}: rows without their image (NNNNN.png): {_name_some(missing)}")
    rows = [files[int(v)] for v in ids]
    with_rows = {folder for _, folder in rows}
    labelled = [folder for folder in folders if folder in with_rows]
    for folder in sorted(set(folders) - set(labelled)):  # its images could be neither trained on nor scored
        log.info("%s/: none of its images is in %s: unlabelled, not used", folder, csv_path.name)
    if labelled and "training" not in labelled:
        raise UserInputError(f"{root}: {'/, '.join(labelled)}/ without training/ (expected training/, and "
                             "validation/ and test/ if the split is yours, or every image in one folder)")
    own_split = {"training": "train", "validation": "val", "test": "test"} if len(labelled) == 3 else \
        {"validation": "test"} if set(labelled) == {"training", "validation"} else \
        {"test": "test"} if set(labelled) == {"training", "test"} else {}
    items = pd.DataFrame({
        "path": [path for path, _ in rows],
        "label": [classes[n.lower()] for n in names],
        "split": [own_split.get(folder) for _, folder in rows],
    })
    index = ImageIndex(root=root, items=items, classes=list(HEP2_CLASSES))
    empty = [name for name, n in index.class_counts().items() if n == 0]
    if empty:
        raise UserInputError(f"{csv_path}: no images of class {_name_some(empty)}")
    return index


def _is_ascii_number(text: str) -> bool:
    """0-9 only: str.isdigit() also accepts '²' or '٣', which int() refuses or reads as another number."""
    return text.isascii() and text.isdigit()


def import_lung_masks(root: Path) -> ImageIndex:
    """LungNeuralNet layout: `<root>/.../Original/<name>.<ext>` and, beside `Original/`, one folder
    per target holding a mask of the same name (any image extension; lossy JPEG is thresholded).

    Every image needs a mask in every target folder, of the image's size (read from the headers,
    upright by their EXIF orientation).
    Names are `<animal>_<genotype>_FLU_<field>`: the fields of one animal share a split part.
    """
    from tune_cells.data.images import ImageRefused, open_image, upright_size

    root = require_dir(root)
    originals = sorted({p for p in root.rglob("*") if p.is_dir() and p.name.lower() == "original"})
    if not originals:
        raise UserInputError(f"--data {root}: no Original/ folder (expected .../Original/<name>.jpg and a mask "
                             "folder per target beside it, e.g. Parenchyma/, SevereInflammation/)")
    if len(originals) > 1:
        raise UserInputError(f"--data {root}: several Original/ folders ({_name_some([str(o.relative_to(root)) for o in originals])}); "
                             "point --data at one of their parents")
    original = originals[0]
    target_dirs = class_folders(original.parent, (d for d in original.parent.iterdir() if d.is_dir()
                                                  and d != original and not d.name.startswith(".")))
    targets = [class_name(d.name) for d in target_dirs]
    if not targets:
        raise UserInputError(f"{original.parent}: no mask folders beside Original/ (one folder per target)")
    images = sorted(require_text_name(p) for p in original.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise UserInputError(f"{original}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    masks_by_stem: dict[str, dict[str, Path]] = {}
    for target, folder in zip(targets, target_dirs):
        masks_by_stem[target] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                other = masks_by_stem[target].setdefault(require_text_name(path).stem, path)
                if other != path:  # which one would be read is the file system's order
                    raise UserInputError(f"{target}/: two masks for {path.stem}: {other.name} and {path.name}")

    def size_of(path: Path) -> tuple[int, int]:
        try:
            with open_image(path) as image:
                return upright_size(image)  # as decoded: a mask turned by its EXIF tag lies as its image does
        except ImageRefused as exc:
            raise UserInputError(f"{path}: {exc}") from None
        except DECODE_ERRORS as exc:
            raise UserInputError(f"{path}: not a readable image ({type(exc).__name__})") from None

    rows = []
    for image in images:
        row = {"path": image.relative_to(root).as_posix(), "label": 0,
               GROUP_COLUMN: image.stem.split("_")[0] if "_" in image.stem else None}
        size = size_of(image)
        for target in targets:
            mask = masks_by_stem[target].get(image.stem)
            if mask is None:
                raise UserInputError(f"{image.relative_to(root)}: no mask {target}/{image.stem}.* beside Original/")
            if size_of(mask) != size:
                raise UserInputError(f"{mask.relative_to(root)}: mask is {size_of(mask)[0]}x{size_of(mask)[1]}, "
                                     f"its image is {size[0]}x{size[1]}")
            row[f"mask:{target}"] = mask.relative_to(root).as_posix()
        rows.append(row)
    items = pd.DataFrame(rows)
    return ImageIndex(root=root, items=items, classes=targets, kind="segmentation",
                      group_source="animal (the file name up to its first _)" if items[GROUP_COLUMN].any() else "")
