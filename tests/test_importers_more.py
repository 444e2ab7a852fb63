"""Bring-your-own folders and ALL-IDB naming, on generated files of each layout."""

import numpy as np
import pytest
from PIL import Image

from tune_cells.data.demo import generate_all_idb, generate_folder
from tune_cells.errors import UserInputError
from tune_cells.tasks import get_task

folder = get_task("folder")
leukemia = get_task("leukemia")


def image(path, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(path)


def test_folder_classes_are_sorted_folder_names_and_litter_is_ignored(tmp_path):
    for cls in ("zeta", "alpha", "mid"):
        for n in range(3):
            image(tmp_path / cls / f"{n}.PNG")
    image(tmp_path / "alpha" / "nested" / "deep.jpg")
    (tmp_path / "alpha" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "mid" / "Thumbs.db").write_bytes(b"x")
    index = folder.importer(tmp_path)
    assert index.classes == ["alpha", "mid", "zeta"]
    assert index.class_counts() == {"alpha": 4, "mid": 3, "zeta": 3}
    assert "alpha/nested/deep.jpg" in set(index.items["path"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: image(r / "only" / "a.png"), "expected one folder per class"),
        (lambda r: (image(r / "a" / "1.png"), (r / "b").mkdir()), "no images in class folder b"),
        (lambda r: (image(r / "a" / "1.png"), image(r / "b" / "1.png"), (r / "b" / "notes.txt").write_text("x")),
         "not image files"),
    ],
)
def test_folder_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserInputError, match=message):
        folder.importer(tmp_path)


def test_all_idb_names_any_extension_and_case(tmp_path):
    for name in ("Im001_1.jpg", "Im002_1.TIF", "im003_0.Jpg", "Im004_0.png"):
        image(tmp_path / "ALL_IDB2" / "img" / name)
    (tmp_path / "ALL_IDB2" / "img" / "Im001_1.xyc").write_text("10 10")  # ALL-IDB1 coordinates: skipped
    index = leukemia.importer(tmp_path)
    assert index.classes == ["normal", "blast"]
    labels = dict(zip(index.items["path"], index.items["label"]))
    assert labels["ALL_IDB2/img/Im002_1.TIF"] == 1 and labels["ALL_IDB2/img/im003_0.Jpg"] == 0


@pytest.mark.parametrize(
    "names, message",
    [
        (["Im001_1.jpg", "cell.jpg"], "not named ImNNN_L"),
        (["Im001_1.jpg", "Im001_1.tif", "Im002_0.jpg"], "image Im001_1 is there twice: Im001_1.jpg and Im001_1.tif"),
        (["Im001_1.jpg", "Im002_1.jpg"], "no images of class normal"),
        (["Im001_2.jpg"], "not named ImNNN_L"),
    ],
)
def test_all_idb_errors(tmp_path, names, message):
    for name in names:
        image(tmp_path / name)
    with pytest.raises(UserInputError, match=message):
        leukemia.importer(tmp_path)


def test_all_idb1_and_2_together_are_ambiguous(tmp_path):
    image(tmp_path / "ALL_IDB1" / "im" / "Im001_1.jpg")
    image(tmp_path / "ALL_IDB2" / "img" / "Im001_0.tif")
    with pytest.raises(UserInputError, match="both ALL_IDB1 and ALL_IDB2"):
        leukemia.importer(tmp_path)


def test_demo_data_of_each_layout_imports(tmp_path):
    index = leukemia.importer(generate_all_idb(tmp_path / "leuk", counts=(4, 5)))
    assert index.class_counts() == {"normal": 4, "blast": 5}
    index = folder.importer(generate_folder(tmp_path / "byo", ["a", "b", "c", "d"], counts=(2, 3, 2, 2)))
    assert index.class_counts() == {"a": 2, "b": 3, "c": 2, "d": 2}


hep2 = get_task("hep2")


def write_hep2(root, folders, per_class=3):
    from tune_cells.data.importers import HEP2_CLASSES

    rows, number = ["Image ID,Image class"], 0
    for label, name in enumerate(HEP2_CLASSES):
        for k in range(per_class):
            number += 1
            folder = folders[(label + k) % len(folders)] if folders else ""
            image(root / folder / f"{number:05d}.png")
            rows.append(f"{number},{name}")
    (root / "gt_training.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(
    "folders, expected",
    [
        (["training", "validation", "test"], {"train", "val", "test"}),
        (["training", "validation"], {None, "test"}),
        ([], {None}),
    ],
)
def test_hep2_layouts_decide_the_split(tmp_path, folders, expected):
    index = hep2.importer(write_hep2(tmp_path, folders))
    assert len(index.items) == 18 and index.classes[0] == "Homogeneous"
    assert {None if isinstance(x, float) else x for x in index.items["split"]} == expected  # NaN: not fixed
    assert index.items["path"].iloc[0].endswith("00001.png")  # unpadded CSV id -> padded file name


def test_hep2_validation_folder_is_the_test_part(tmp_path):
    from tune_cells.data.splits import make_parts

    index = hep2.importer(write_hep2(tmp_path, ["training", "validation"], per_class=8))
    parts = make_parts(index, seed=0)
    assert all(p.startswith("validation/") for p in parts["test"])
    assert all(p.startswith("training/") for p in parts["train"] + parts["val"]) and parts["val"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: (r / "gt_training.csv").write_text("Image ID,Image class\n1,Sparkly\n"), "unknown class Sparkly"),
        (lambda r: (r / "gt_training.csv").write_text("Image ID,Image class\n999,Golgi\n"), "rows without their image"),
        (lambda r: (r / "gt_training.csv").write_text("ID,Class\n1,Golgi\n"), "needs columns"),
        (lambda r: (r / "gt_training.csv").unlink(), "gt_training.csv: missing"),
    ],
)
def test_hep2_errors(tmp_path, edit, message):
    write_hep2(tmp_path, ["training", "validation"])
    edit(tmp_path)
    with pytest.raises(UserInputError, match=message):
        hep2.importer(tmp_path)


def test_hep2_demo_is_greyscale_in_the_contest_layout(tmp_path):
    from tune_cells.data.demo import generate_hep2

    root = generate_hep2(tmp_path / "hep2", per_class=4)
    index = hep2.importer(root)
    assert index.class_counts()["Golgi"] == 4
    assert Image.open(root / index.items["path"].iloc[0]).mode == "L"


def test_pretrained_space_without_weights_exits_2_naming_the_file(run_cli, tmp_path, monkeypatch):
    from tune_cells.search_spaces import builtin_space_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    result = run_cli("search", "hep2", "--space", builtin_space_path("hep2-pretrained"), "--workdir", tmp_path / "w")
    assert result.code == 2
    assert "pretrained alexnet needs" in result.err or "pretrained mobilenet_v2 needs" in result.err
    assert str(tmp_path / "empty-cache" / "hub" / "checkpoints") in result.err
    assert not (tmp_path / "w").exists()
