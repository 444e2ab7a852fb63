"""Resolution that fits the data (#15): each dataset is decoded at its native size within the task's
bounds, the preflight says which and why, and scratch ResNets can take a small-input stem."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tune_cells.data.resolution import choose_store_size, clamp_store_size, native_side
from tune_cells.errors import UserInputError
from tune_cells.models import create_model


def write_images(folder, count: int, size: tuple[int, int], prefix: str = "") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    names = []
    for i in range(count):
        name = f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


@pytest.mark.parametrize("size, floor, cap, expected, why", [
    ((363, 360), 128, 256, 256, "native 363 px (median longer side of 5 images), capped at 256 px"),
    ((100, 100), 100, 256, 100, "native 100 px (median longer side of 5 images)"),
    ((200, 150), 128, 256, 200, "native 200 px"),
    ((60, 60), 128, 256, 128, "enlarged to the task's smallest store size 128 px"),  # as before native sizes
    ((363, 360), 128, 0, 128, "the task's fixed size 128 px"),
])
def test_the_decode_size_is_the_native_size_within_the_tasks_bounds(tmp_path, size, floor, cap, expected, why):
    paths = write_images(tmp_path, 5, size)
    chosen = choose_store_size(tmp_path, paths, floor, cap)
    assert chosen.size == expected and why in chosen.reason


def test_the_native_size_is_a_median_of_an_even_sample_of_headers(tmp_path):
    paths = write_images(tmp_path, 6, (40, 40), "a") + write_images(tmp_path, 3, (90, 70), "b")
    (tmp_path / "broken.png").write_bytes(b"not an image")  # the full decoding names it; the median skips it
    assert native_side(tmp_path, [*paths, "broken.png"]) == (40, 9)
    assert native_side(tmp_path, paths, sample=3) == (40, 3)  # first, middle and last only
    assert clamp_store_size(300, 128, 96) == 96  # a cap below the floor wins: it is the memory limit


def folder_dataset(root, size: tuple[int, int], per_class: int = 12):
    for name in ("blast", "normal"):
        write_images(root / name, per_class, size)
    return root


SPACE = "params:\n  model: small_convnet\n  depth: 1\n  width: 4\n  lr: 0.01\n"


@pytest.mark.parametrize("image_size, cap, expected, why", [
    ("", None, 256, "capped at 256 px (max store size)"),  # no image_size: the network sees the decoded size
    ("", 160, 160, "capped at 160 px (--max-store-size)"),
    # decoding beyond the largest input a trial can ask for keeps nothing it uses (never below the floor)
    ("  image_size: {choices: [96, 224]}\n", None, 224, "capped at 224 px (the space's largest image_size)"),
    ("  image_size: 32\n", None, 128, "capped at 128 px (the space's largest image_size)"),
])
def test_the_preflight_decodes_at_the_size_it_chose_and_says_why(tmp_path, caplog, image_size, cap, expected, why):
    from tune_cells.preflight import SearchOptions, check_inputs, check_pixels

    (tmp_path / "space.yaml").write_text(SPACE + image_size)
    opts = SearchOptions(task="folder", data=folder_dataset(tmp_path / "data", (300, 280)), workdir=tmp_path / "work",
                         space=tmp_path / "space.yaml", max_store_size=cap)
    with caplog.at_level(logging.INFO, logger="tune_cells.preflight"):
        prep = check_inputs(opts)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoding folder images")]
    assert len(lines) == 1 and f"at {expected} px: native 300 px" in lines[0] and "MB held in memory" in lines[0]
    assert why in lines[0]
    check_pixels(prep)
    assert {pixels.shape for pixels in prep.decoded.values()} == {(expected, expected, 3)}
    assert not (tmp_path / "work").exists()  # the preflight writes nothing


@pytest.mark.parametrize("args, message", [
    (["search", "lung", "--max-store-size", "64"], "task lung keeps each image's own size"),
    (["search", "nuclei", "--max-store-size", "8"], "--max-store-size 8: must be at least 16 px"),
])
def test_a_bad_max_store_size_is_one_line_and_exit_2(run_cli, tmp_path, args, message):
    result = run_cli(*args, "--workdir", tmp_path / "work")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("tune-cells: error:") and message in lines[0]


def last_stage_side(name: str, channels: int, side: int, **kwargs) -> int:
    model = create_model(name, num_classes=3, in_channels=channels, **kwargs).eval()
    seen = []
    model.layer4.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        assert model(torch.zeros(1, channels, side, side)).shape == (1, 3)
    return seen[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_small_stem_keeps_four_times_the_resolution(name, channels):
    assert last_stage_side(name, channels, 64) == 2  # the ImageNet stem (and older models): 64 px -> 2x2
    assert last_stage_side(name, channels, 64, stem="small") == 8
    assert last_stage_side(name, channels, 48, stem="small") == 6


def test_the_small_stem_is_searched_only_where_the_data_is_small_enough():
    # ~16x the compute per image: leukemia's ~126 training images take ~20 s an epoch with it, while
    # hep2's offline default drew it for both trials on 7,133 cells and finished no epoch in 10 min
    import optuna

    from tune_cells.search_spaces import builtin_space_path, load_space

    for name in ("nuclei-scratch", "hep2-scratch", "folder-scratch"):
        assert "stem" not in load_space(builtin_space_path(name)).params
    space, study = load_space(builtin_space_path("leukemia-scratch")), optuna.create_study()
    for _ in range(40):
        config = space.sample(study.ask())
        assert ("stem" in config) == (config["model"] == "resnet18" and config["image_size"] == 64)


def test_the_small_stem_is_refused_with_imagenet_weights_and_unknown_stems_by_name(run_cli, tmp_path):
    with pytest.raises(UserInputError, match="stem 'small' is a new, untrained first layer"):
        create_model("resnet18", num_classes=2, in_channels=3, pretrained=True, stem="small", load_weights=False)
    with pytest.raises(UserInputError, match="unknown stem 'tiny'; known: imagenet, small"):
        create_model("resnet18", num_classes=2, in_channels=3, stem="tiny")
    (tmp_path / "space.yaml").write_text("params:\n  model: resnet18\n  pretrained: true\n  stem: small\n  lr: 0.01\n")
    result = run_cli("search", "nuclei", "--space", tmp_path / "space.yaml", "--workdir", tmp_path / "work")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.err
    assert "model resnet18: stem 'small' is a new, untrained first layer and cannot take ImageNet weights" in lines[0]


def tiny_data(side: int):
    from tune_cells.trainables.classification import ClassificationData

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8)
    images = rng.integers(0, 120, (16, side, side, 3), dtype=np.uint8)
    images[labels == 1] += 120
    return ClassificationData(images, labels, images[:6], labels[:6], "folder", ["dim", "bright"], 3, side,
                              (0.4,) * 3, (0.25,) * 3, max_epochs=1, seed=0)


def test_a_small_stem_resnet_trains_predicts_exports_and_explains(tmp_path):
    from tune_cells.analysis.explain import explain_file
    from tune_cells.classifier import ImageClassifier
    from tune_cells.exporting import ONNX, ExportedModel, export_checked
    from tune_cells.kinds import CLASSIFICATION
    from tune_cells.trainables.classification import train_classifier
    from tune_cells.trainables.skeleton import LocalSession

    data = tiny_data(48)
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    config = {"model": "resnet18", "stem": "small", "lr": 0.01, "batch_size": 8, "image_size": 48}
    train_classifier(config, data, session)  # two optimiser steps at 48 px
    assert session.failure is None and np.isfinite(session.results[0]["train_loss"])
    classifier = ImageClassifier.from_checkpoint(tmp_path / "ckpt")
    assert classifier.spec.input_stem == "small" and classifier.spec.store_size == 48
    assert isinstance(classifier.model.maxpool, torch.nn.Identity)
    probs = classifier.predict_proba(data.val_images)
    assert probs.shape == (6, 2) and np.allclose(probs.sum(1), 1)

    plan = CLASSIFICATION.export_plan(classifier)
    model = ExportedModel("models:/test/1", "test", "1", "folder", "classification", "")
    result = export_checked(plan, ONNX, data.val_images, tmp_path / "model.onnx", model, "the validation part")
    assert result.parity.passed and result.document["input"]["shape"][-1] == 48

    Image.fromarray(data.val_images[1]).save(tmp_path / "cell.png")
    shown = explain_file(classifier, tmp_path / "cell.png", tmp_path / "explained", steps=4)
    assert (tmp_path / "explained" / "cell_attributions.png").is_file() and shown["predicted_class"] in ("dim", "bright")


def test_a_resnet_saved_before_the_stem_choice_loads_and_predicts_the_same(tmp_path):
    """What the code before the stem wrote: torchvision's ResNet-18 with a dropout + linear head, its
    spec's configuration without `stem`."""
    import torchvision

    from tune_cells.classifier import ImageClassifier
    from tune_cells.transforms import EvalPreset

    torch.manual_seed(0)
    network = torchvision.models.resnet18()
    network.fc = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(512, 2))
    network.eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    spec = {"task": "folder", "architecture": "resnet18", "classes": ["a", "b"], "channels": 3, "store_size": 128,
            "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "format": 2, "kind": "classification",
            "config": {"model": "resnet18", "dropout": 0.1, "pretrained": False, "lr": 0.01, "image_size": 64}}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    images = np.random.default_rng(1).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.softmax(network(EvalPreset(64, (0.5,) * 3, (0.25,) * 3)(images)).double(), 1).numpy()
    loaded = ImageClassifier.from_checkpoint(tmp_path)
    assert loaded.spec.input_stem == "default"
    np.testing.assert_allclose(loaded.predict_proba(images), expected, atol=1e-6)
