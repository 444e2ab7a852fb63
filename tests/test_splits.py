"""Splits keep related images together: near-duplicates (planted exact and near twins), a group key
(lung's animal, groups.csv, --group-pattern), a layout's fixed test part (twins left out, listed),
split files that record groups (format 2) and older ones without (format 1)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_cells.data.groups import apply_group_pattern
from tune_cells.data.images import image_hashes
from tune_cells.data.splits import PARTS, load_or_create_split, plan_split, split_path
from tune_cells.errors import UserInputError
from tune_cells.tasks import get_task

from conftest import write_kaggle


def smooth(rng: np.random.Generator, size: int = 40, grey: bool = False) -> np.ndarray:
    """A smooth random image (blobs, like a stained cell): its dHash is stable under recompression."""
    coarse = rng.integers(0, 256, (5, 5) if grey else (5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def near_twin(pixels: np.ndarray, how: str) -> Image.Image:
    """A near-identical copy: JPEG-recompressed, brightened, or with a little noise."""
    if how == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        return Image.open(io.BytesIO(buffer.getvalue())).convert(Image.fromarray(pixels).mode)
    if how == "brighter":
        return Image.fromarray(np.clip(pixels.astype(int) + 10, 0, 255).astype(np.uint8))
    noise = np.random.default_rng(99).integers(-3, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8))


def write_folder_with_twins(root: Path, per_class: int = 20) -> list[tuple[str, str]]:
    """A folder-task dataset (classes a, b, c) with planted exact and near twins and a groups.csv;
    returns the planted related pairs (relative paths)."""
    rng = np.random.default_rng(5)
    pixels = {}
    for cls in "abc":
        (root / cls).mkdir(parents=True)
        for n in range(per_class):
            pixels[f"{cls}/{n}.png"] = smooth(rng)
            Image.fromarray(pixels[f"{cls}/{n}.png"]).save(root / cls / f"{n}.png")
    pairs = []
    for k, (source, how) in enumerate([("a/0.png", "exact"), ("b/1.png", "exact"), ("c/2.png", "jpeg"),
                                       ("a/3.png", "brighter"), ("b/4.png", "noise"), ("c/5.png", "exact")]):
        twin = f"{source[0]}/twin{k}.png"
        if how == "exact":
            shutil.copy(root / source, root / twin)
        else:
            near_twin(pixels[source], how).save(root / twin)
        pairs.append((source, twin))
    pairs.append(("a/twin0.png", "a/twin-of-twin.png"))  # a chain: a/0 ~ a/twin0 ~ this one
    shutil.copy(root / "a/0.png", root / "a/twin-of-twin.png")
    (root / "groups.csv").write_text("path,group\na/10.png,patient-1\nb/10.png,patient-1\nc/10.png,patient-1\n"
                                     "a/11.png,patient-2\nb/12.png,patient-2\n")
    pairs += [("a/10.png", "b/10.png"), ("b/10.png", "c/10.png"), ("a/11.png", "b/12.png")]
    return pairs


def part_of(split) -> dict[str, str]:
    return {path: part for part, paths in split.parts.items() for path in paths}


def test_near_duplicates_and_groups_never_cross_parts(tmp_path):
    folder = get_task("folder")
    pairs = write_folder_with_twins(tmp_path / "data")
    index = folder.importer(tmp_path / "data")
    assert index.group_source == "groups.csv"
    hashes = image_hashes(index.root, list(index.items["path"]))
    for seed in range(4):
        split = plan_split(tmp_path / f"s{seed}.json", index, seed, hashes)
        where = part_of(split)
        assert len(where) == len(index.items) and not split.excluded
        for a, b in pairs:
            assert where[a] == where[b], (seed, a, b)
        assert split.sizes()["test"] in range(8, 12) and split.sizes()["val"] in range(8, 12)
        assert split.grouping["merged_by_near_duplicates"] == 6  # the chain is one group
    assert plan_split(tmp_path / "again.json", index, 3, hashes).parts == split.parts  # deterministic per seed
    saved = json.loads(load_or_create_split(tmp_path / "s.json", index, 3, hashes).path.read_text())
    assert saved["format"] == 2 and saved["excluded"] == []
    assert sorted(saved["groups"]["patient-1"]) == ["a/10.png", "b/10.png", "c/10.png"]
    assert ["a/0.png", "a/twin-of-twin.png", "a/twin0.png"] in saved["groups"].values()


def test_a_dataset_without_groups_splits_exactly_as_before(tmp_path):
    """The parts the code made before groups existed (pinned): existing work folders stay valid."""
    index = get_task("nuclei").importer(write_kaggle(tmp_path / "d", [0] * 20 + [1] * 40 + [2] * 20 + [3] * 20))
    split = plan_split(tmp_path / "s.json", index, 3, image_hashes(index.root, list(index.items["path"])))
    assert split.groups == {}
    assert split.parts["test"] == [f"train/{n}.png" for n in (11, 23, 35, 38, 4, 43, 47, 59, 62, 75, 78, 81, 86, 9, 94)]
    assert split.parts["val"] == [f"train/{n}.png" for n in (10, 100, 18, 21, 25, 31, 46, 49, 56, 61, 7, 71, 73, 88,
                                                             98)]


def write_lung_like(root: Path, fields: dict[str, int], size=(24, 16)) -> Path:
    """LungNeuralNet names `<animal>_<genotype>_FLU_<field>` with small blank images and masks."""
    rng = np.random.default_rng(1)
    for animal, count in fields.items():
        for field in range(1, count + 1):
            name = f"{animal}_{'KO' if int(animal) % 2 else 'WT'}_FLU_{field}.jpg"
            for sub in ("Original", "Parenchyma", "SevereInflammation"):
                (root / "train" / sub).mkdir(parents=True, exist_ok=True)
                image = smooth(rng, 16) if sub == "Original" else np.zeros((16, 16), np.uint8)
                Image.fromarray(image).resize(size).save(root / "train" / sub / name)
    return root


def test_lung_is_split_by_animal(tmp_path):
    fields = {"6": 2, "7": 1, "12": 1, "18": 2, "36": 1, "39": 1, "40": 2, "41": 3, "42": 1, "43": 2}
    index = get_task("lung").importer(write_lung_like(tmp_path / "lung", fields))
    hashes = image_hashes(index.root, list(index.items["path"]))
    for seed in range(5):
        split = plan_split(tmp_path / f"{seed}.json", index, seed, hashes)
        animals = {}
        for path, part in part_of(split).items():
            animals.setdefault(Path(path).name.split("_")[0], set()).add(part)
        assert all(len(parts) == 1 for parts in animals.values()), animals
        assert set(animals) == set(fields) and all(split.parts.values())
        assert set(split.groups) == set(fields)
        assert split.units("test") == [Path(p).name.split("_")[0] for p in split.parts["test"]]


def write_hep2_with_twins(root: Path) -> dict[str, list]:
    """ICPR layout, validation/ the fixed test part, with planted twins inside training/, across
    training/ and validation/ (exact and near), and inside validation/."""
    rng = np.random.default_rng(2)
    rows, pixels, number = ["Image ID,Image class"], {}, 0
    classes = ["Homogeneous", "Speckled", "Nucleolar", "Centromere", "NuMem", "Golgi"]

    def add(folder: str, label: int, image: Image.Image) -> str:
        nonlocal number
        number += 1
        path = f"{folder}/{number:05d}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / path)
        rows.append(f"{number},{classes[label]}")
        return path

    for label in range(6):
        for k in range(14):
            folder = "validation" if k % 5 == 0 else "training"
            array = smooth(rng, 32, grey=True)
            pixels[add(folder, label, Image.fromarray(array))] = (array, label)
    training = [p for p in pixels if p.startswith("training/")]
    validation = [p for p in pixels if p.startswith("validation/")]
    planted = {"inside_training": [], "across": [], "inside_validation": []}
    for k, how in enumerate(["exact", "jpeg", "exact", "brighter"]):
        source = training[7 * k]
        array, label = pixels[source]
        planted["inside_training"].append((source, add("training", label, near_twin(array, how)
                                                       if how != "exact" else Image.fromarray(array))))
    for k, how in enumerate(["exact", "exact", "noise", "jpeg", "exact"]):
        source = validation[2 * k]
        array, label = pixels[source]
        planted["across"].append((source, add("training", label, near_twin(array, how)
                                              if how != "exact" else Image.fromarray(array))))
    array, label = pixels[validation[1]]
    planted["inside_validation"].append((validation[1], add("validation", label, Image.fromarray(array))))
    (root / "gt_training.csv").write_text("\n".join(rows) + "\n")
    return planted


def own_dhash(path: Path) -> np.ndarray:
    """A 256-bit difference hash computed here, not by the code under test."""
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L").resize((17, 16), Image.Resampling.BILINEAR), dtype=np.int32)
    return (grey[:, 1:] > grey[:, :-1]).ravel()


def test_independent_check_no_twin_crosses_parts_through_the_preflight(tmp_path):
    """The rule checked without the code under test: exact pixel twins (bytes of the decoded
    arrays) and pairs within 20 bits of a hash computed here, between every two parts."""
    from tune_cells.preflight import SearchOptions, check_inputs, check_pixels

    planted = write_hep2_with_twins(tmp_path / "hep2")
    prep = check_inputs(SearchOptions(task="hep2", data=tmp_path / "hep2", workdir=tmp_path / "w"))
    check_pixels(prep)  # the search's preflight, in its order (run_search)
    assert not (tmp_path / "w").exists()  # the preflight writes nothing
    split, root = prep.split, prep.index.root
    assert set(prep.decoded) == set(split.parts["train"]) | set(split.parts["val"])  # no test pixels handed on
    assert not prep.duplicates

    decoded = {}
    for path in prep.index.items["path"]:
        with Image.open(root / path) as image:
            decoded[path] = np.asarray(image).tobytes()
    hashes = {path: own_dhash(root / path) for path in decoded}
    for part_a, part_b in combinations(PARTS, 2):
        for a in split.parts[part_a]:
            for b in split.parts[part_b]:
                assert decoded[a] != decoded[b], (a, part_a, b, part_b)
                assert (hashes[a] != hashes[b]).sum() > 20, (a, part_a, b, part_b)

    excluded = {entry["path"]: entry for entry in split.excluded}
    in_parts = set(part_of(split))
    assert in_parts | set(excluded) == set(decoded) and not in_parts & set(excluded)
    for fixed_test, training_twin in planted["across"]:  # the layout's boundary holds: the twin is left out
        assert fixed_test in split.parts["test"] and training_twin in excluded
        assert excluded[training_twin]["kept_in"] == "test"
    assert len(excluded) == len(planted["across"])
    for a, b in planted["inside_training"]:
        assert part_of(split)[a] == part_of(split)[b] != "test"
    assert split.units("test") is not None  # the twins inside validation/ are one bootstrap unit
    assert len(set(split.units("test"))) == len(split.parts["test"]) - 1


def test_a_split_file_that_breaks_a_group_is_exit_2_through_search(tmp_path, run_cli):
    write_folder_with_twins(tmp_path / "data")
    index = get_task("folder").importer(tmp_path / "data")
    workdir = tmp_path / "w"
    split = load_or_create_split(split_path(workdir, "folder", index, 0), index, 0,
                                 image_hashes(index.root, list(index.items["path"])))
    payload = json.loads(split.path.read_text())
    where = part_of(split)
    moved = payload["groups"]["patient-1"][0]
    payload[where[moved]].remove(moved)
    payload[next(part for part in PARTS if part != where[moved])].append(moved)
    split.path.write_text(json.dumps(payload))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in workdir.rglob("*") if p.is_file()}

    result = run_cli("search", "folder", "--data", tmp_path / "data", "--workdir", workdir)
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.err
    assert "group patient-1 is in both" in lines[0] and split.path.name in lines[0]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in workdir.rglob("*") if p.is_file()} == before


def test_an_older_split_file_without_groups_warns_once_and_still_works(tmp_path, caplog):
    write_folder_with_twins(tmp_path / "data")
    index = get_task("folder").importer(tmp_path / "data")
    path = tmp_path / "old.json"
    parts = {"train": [], "val": [], "test": []}
    for n, image in enumerate(sorted(index.items["path"])):  # a format-1 file that splits patient-1
        parts[PARTS[n % 3]].append(image)
    path.write_text(json.dumps({"format": 1, "seed": 0, **parts}))
    with caplog.at_level(logging.WARNING, logger="tune_cells.data.splits"):
        split = load_or_create_split(path, index, 0)
    assert split.parts == parts and split.groups is None and split.units("test") is None
    assert len(caplog.records) == 1
    assert str(path) in caplog.text and "from before groups" in caplog.text and "patient-1" in caplog.text
    assert json.loads(path.read_text()) == {"format": 1, "seed": 0, **parts}  # left as it was


def test_group_pattern_and_groups_csv(tmp_path, run_cli):
    root = write_kaggle(tmp_path / "d", [0, 1, 2, 3] * 6)
    index = get_task("nuclei").importer(root)
    apply_group_pattern(index, r"train/(\d)")  # the first digit: 1, 10-19 ... share a group
    assert index.items.set_index("path").at["train/13.png", "group"] == "1"
    apply_group_pattern(index, r"\d+\.png")  # no capture group: the whole match
    assert index.items["group"].iloc[0] == "1.png"
    with pytest.raises(UserInputError, match="matches none of the 24 image paths"):
        apply_group_pattern(index, r"^nowhere/")
    result = run_cli("search", "nuclei", "--data", root, "--group-pattern", "(", "--workdir", tmp_path / "w")
    assert result.code == 2 and "--group-pattern '(': not a regular expression" in result.err

    write_folder_with_twins(tmp_path / "f")
    (tmp_path / "f" / "groups.csv").write_text("path,group\na/99.png,x\n")
    with pytest.raises(UserInputError, match=r"groups.csv: a/99.png is not an image of the dataset"):
        get_task("folder").importer(tmp_path / "f")
    (tmp_path / "f" / "groups.csv").write_text("image,patient\na/1.png,x\n")
    with pytest.raises(UserInputError, match="needs columns path,group"):
        get_task("folder").importer(tmp_path / "f")


def test_identical_images_too_few_groups_to_split_is_exit_2(tmp_path):
    for cls in "ab":
        (tmp_path / cls).mkdir()
        for n in range(5):
            Image.new("RGB", (16, 16), (40, 80, 120)).save(tmp_path / cls / f"{n}.png")
    index = get_task("folder").importer(tmp_path)
    with pytest.raises(UserInputError, match="groups of related images are too few"):
        plan_split(tmp_path / "s.json", index, 0, image_hashes(index.root, list(index.items["path"])))


def classes_per_part(split, index) -> dict[str, set[str]]:
    label = dict(zip(index.items["path"], index.items["label"]))
    return {part: {index.classes[label[p]] for p in paths} for part, paths in split.parts.items()}


def test_every_part_gets_every_class_even_one_of_three_images(tmp_path):
    """Stratifying rounds a class of 3 images among 300 to no validation or test image at all (0.45
    of a 15% part): balanced accuracy would then describe 3 classes of 4."""
    for name, labels in {"rare": [0] * 3 + [1, 2, 3] * 100, "tiny": [0, 1, 2, 3] * 3}.items():
        index = get_task("nuclei").importer(write_kaggle(tmp_path / name, labels, size=8))
        for seed in range(3):
            split = plan_split(tmp_path / f"{name}{seed}.json", index, seed)
            assert all(found == set(index.classes) for found in classes_per_part(split, index).values()), (name, seed)
    assert split.sizes() == {"train": 4, "val": 4, "test": 4}  # 4 classes x 3 images: one of each per part


def write_patients(root: Path, patients: dict[str, dict[str, int]]) -> Path:
    """A folder-task dataset whose groups.csv names each image's patient: {patient: {class: images}}."""
    rng = np.random.default_rng(2)
    rows = ["path,group"]
    for patient, classes in patients.items():
        for cls, count in classes.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for n in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{patient}-{n}.png")
                rows.append(f"{cls}/{patient}-{n}.png,{patient}")
    (root / "groups.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_class_of_few_patients_is_in_every_part_and_no_patient_crosses_parts(tmp_path):
    patients = {f"p{n}": {"common": 6, "other": 4} for n in range(12)}
    for n in range(3):  # the rare class: three patients, one image each, each patient also with common images
        patients[f"p{n}"]["rare"] = 1
    index = get_task("folder").importer(write_patients(tmp_path / "d", patients))
    for seed in range(5):
        split = plan_split(tmp_path / f"{seed}.json", index, seed)
        assert all(found == {"common", "other", "rare"} for found in classes_per_part(split, index).values()), seed
        for patient in patients:
            assert len({part for part, paths in split.parts.items() for p in paths if f"/{patient}-" in p}) == 1


def test_a_class_all_of_one_patient_is_refused_naming_it(tmp_path):
    patients = {f"p{n}": {"common": 5, "other": 5} for n in range(10)}
    patients["p0"]["rare"] = 4  # four images, one patient: it cannot be in three parts
    index = get_task("folder").importer(write_patients(tmp_path / "d", patients))
    with pytest.raises(UserInputError) as refused:
        plan_split(tmp_path / "s.json", index, 0)
    assert str(refused.value) == (f"{index.root}: class rare has 4 images in 1 group(s) of related images (one "
                                  "animal, patient or near-duplicate set each, never split): each of the 3 parts "
                                  "needs one of its groups")
    assert not (tmp_path / "s.json").exists()


def test_a_split_file_whose_part_lacks_a_class_is_used_as_written_with_one_warning(tmp_path, caplog):
    index = get_task("nuclei").importer(write_kaggle(tmp_path / "d", [0] * 3 + [1, 2, 3] * 10, size=8))
    label = dict(zip(index.items["path"], index.items["label"]))
    parts = {"train": [], "val": [], "test": []}
    for n, image in enumerate(sorted(index.items["path"], key=lambda p: label[p])):  # class 0 all in train
        parts[PARTS[n % 3] if label[image] else "train"].append(image)
    path = tmp_path / "made-before.json"
    path.write_text(json.dumps({"format": 2, "seed": 0, **parts, "groups": {}}))
    with caplog.at_level(logging.WARNING):
        split = load_or_create_split(path, index, 0)
    assert split.parts == parts and [r.getMessage() for r in caplog.records] == [
        f"{path}: the val part has no image of class normal_epithelial: its metrics leave that class out; delete the "
        "file to split again (the parts will change)"]
