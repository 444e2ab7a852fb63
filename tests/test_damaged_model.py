"""A damaged model folder (its model.json, model.pt or fold members) is one line naming the file and
what is wrong (exit 2): never a traceback, NaN probabilities, a blamed image or a file read outside
the model folder. A registered model's line names its URI, not the download folder that is gone.

The folders are copies of the format-1 fixture model (tests/fixtures/model-format1), changed by hand.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tune_cells.errors import UserInputError
from tune_cells.kinds import load_predictor

from conftest import FORMAT1_MODEL, model_copy, register_model_folder

CHECKPOINT = FORMAT1_MODEL / "artifacts" / "checkpoint"
SPEC = json.loads((CHECKPOINT / "model.json").read_text())
IMAGE = FORMAT1_MODEL.parent / "model-format1-images" / "0.png"


def checkpoint_copy(tmp_path, text: str | None = None, **changes):
    """The fixture's checkpoint folder with model.json replaced by `text`, or with fields changed."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "model.json").write_text(text if text is not None else json.dumps({**SPEC, **changes}))
    return folder


def refusal(folder) -> str:
    with pytest.raises(UserInputError) as raised:
        load_predictor(folder)
    said = str(raised.value)
    assert len(said.splitlines()) == 1, said
    return said


def test_the_format_1_fixture_still_loads_as_it_is(tmp_path):
    predictor = load_predictor(checkpoint_copy(tmp_path, text=(CHECKPOINT / "model.json").read_text()))
    assert predictor.spec.format == 1 and predictor.spec.classes == ["a", "b"]


@pytest.mark.parametrize("text, problem", [
    (json.dumps({k: v for k, v in SPEC.items() if k != "classes"}), "no 'classes' field (required)"),
    (json.dumps({**SPEC, "format": "abc"}), 'format "abc": must be a model format number'),
    (json.dumps({**SPEC, "format": None}), "format null: must be a model format number"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    (json.dumps([SPEC]), "not a model spec (a JSON array, not an object)"),
    (json.dumps({**SPEC, "format": 2, "temperature": 0}), "temperature 0: must be a finite number above 0"),
    (json.dumps({**SPEC, "format": 2, "temperature": float("nan")}), "temperature NaN: must be a finite number"),
    (json.dumps({**SPEC, "store_size": 0}), "store_size 0: a classifier decodes images to a square of at least 1 px"),
    (json.dumps({**SPEC, "store_size": "16"}), 'store_size "16": must be a whole number of px, 0 to 8192'),
    (json.dumps({**SPEC, "image_size": True}), "image_size true: must be a whole number of px, 1 to 8192"),
    (json.dumps({**SPEC, "channels": 2}), "channels 2: must be 1 (grey) or 3 (RGB)"),
    (json.dumps({**SPEC, "mean": [0.5, 0.5]}), "mean has 2 values for 3 channel(s)"),
    (json.dumps({**SPEC, "std": [0.25, 0, 0.25]}), "must be above 0 (inputs are divided by it)"),
    (json.dumps({**SPEC, "classes": "ab"}), 'classes "ab": must be a list of one or more names'),
    (json.dumps({**SPEC, "config": []}), "config []: must be a JSON object"),
    (json.dumps({**SPEC, "format": 2, "thresholds": {"a": 1.5}}), "must map targets to thresholds from 0 to 1"),
    (json.dumps({**SPEC, "format": 2, "members": ["../../x"]}), 'member "../../x" is not a folder name inside'),
    (json.dumps({**SPEC, "format": 2, "members": ["/etc"]}), 'member "/etc" is not a folder name inside'),
    (json.dumps({**SPEC, "kind": "detection"}), "kind 'detection'; known: classification, segmentation"),
])
def test_a_damaged_model_json_is_named_with_its_first_bad_field(tmp_path, text, problem):
    folder = checkpoint_copy(tmp_path, text)
    said = refusal(folder)
    assert said.startswith(f"{folder / 'model.json'}: ") and problem in said, said


@pytest.mark.parametrize("damage, problem", [
    (lambda weights: weights.unlink(), "model.pt: missing (the model's weights)"),
    (lambda weights: weights.write_text("not weights\n" * 20), "model.pt: not a weights file ("),
    (lambda weights: weights.write_bytes(weights.read_bytes()[:1000]), "model.pt: not a weights file ("),
])
def test_missing_or_corrupt_weights_are_named(tmp_path, damage, problem):
    folder = checkpoint_copy(tmp_path, text=(CHECKPOINT / "model.json").read_text())
    damage(folder / "model.pt")
    assert refusal(folder).startswith(f"{folder}/{problem}")


def test_a_class_count_the_weights_do_not_have_is_one_line(tmp_path):
    folder = checkpoint_copy(tmp_path, classes=["a", "b", "c"])
    said = refusal(folder)
    assert said.startswith(f"{folder}/model.pt: does not fit the network model.json describes (size mismatch for ")


def test_fold_members_are_read_only_inside_the_model_folder(tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(CHECKPOINT, outside)  # a valid checkpoint, but not this model's
    folder = checkpoint_copy(tmp_path, format=2, members=["fold0"])
    (folder / "fold0").symlink_to(outside, target_is_directory=True)
    assert refusal(folder) == f"{folder}/model.json: member 'fold0' is no folder inside the model folder"
    (folder / "fold0").unlink()
    assert refusal(folder) == f"{folder}/model.json: member 'fold0' is no folder inside the model folder"


def test_a_damaged_registered_model_is_named_by_its_uri(run_cli, tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    weightless = model_copy(tmp_path, "weightless")
    (weightless / "artifacts" / "checkpoint" / "model.pt").unlink()
    damaged = [
        (model_copy(tmp_path, "cold", format=2, temperature=0), "model.json: temperature 0: must be a finite number"),
        (model_copy(tmp_path, "unsized", store_size=0), "model.json: store_size 0: a classifier decodes images"),
        (model_copy(tmp_path, "three", classes=["a", "b", "c"]), "model.pt: does not fit the network model.json"),
        (model_copy(tmp_path, "escaping", format=2, members=["../../x"]), 'model.json: members ["../../x"]: member'),
        (weightless, "model.pt: missing (the model's weights)"),
    ]
    uris = [register_model_folder(workdir, folder) for folder, _ in damaged]
    capsys.readouterr()  # MLflow's log of creating the store is not the command's
    for uri, (folder, problem) in zip(uris, damaged):
        result = run_cli("predict", "nuclei", IMAGE, "--model-uri", uri, "--workdir", workdir,
                         "--output", tmp_path / f"{folder.name}.csv")
        assert result.code == 2 and result.err.startswith(f"tune-cells: error: {uri}: {problem}"), result.err
        assert len(result.err.strip().splitlines()) == 1 and "tune-cells-model-" not in result.err
        assert not (tmp_path / f"{folder.name}.csv").exists()
    register_model_folder(workdir, damaged[0][0], alias="champion")  # named by the URI the user gave (none)
    result = run_cli("explain", "nuclei", IMAGE, "--workdir", workdir, "--output", tmp_path / "explained")
    assert result.code == 2 and result.err.strip() == (
        "tune-cells: error: models:/tune-cells-nuclei@champion: model.json: temperature 0: must be a finite number "
        "above 0 (logits are divided by it)")
