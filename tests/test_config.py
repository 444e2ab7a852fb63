"""Typed trial configurations: every searchable parameter is declared once, with its default and
allowed values; a space that names anything else fails the preflight, naming it."""

from __future__ import annotations

import pytest

from tune_cells.config import ClassificationConfig, SegmentationConfig
from tune_cells.errors import UserInputError
from tune_cells.kinds import CLASSIFICATION, SEGMENTATION
from tune_cells.models import pretrained_arch, pretrained_available
from tune_cells.preflight import check_space
from tune_cells.search_spaces import load_space
from tune_cells.tasks import get_task, task_names


def test_a_flat_configuration_splits_into_trainer_fields_and_model_arguments():
    config = ClassificationConfig.from_flat({"model": "small_convnet", "lr": 0.01, "depth": 2, "optimizer": "sgd"})
    assert (config.lr, config.optimizer, config.batch_size, config.flip) == (0.01, "sgd", 32, True)
    assert config.model_kwargs == {"depth": 2}
    assert config.to_flat()["depth"] == 2 and config.to_flat()["lr"] == 0.01
    assert ClassificationConfig.from_flat(config.to_flat()) == config  # what a checkpoint stores parses back


@pytest.mark.parametrize("flat, message", [
    ({"model": "small_convnet", "lr": 0.01, "label_smothing": 0.1}, "unknown parameter 'label_smothing'"),
    ({"model": "resnet18", "lr": 0.01, "depth": 3}, "unknown parameter 'depth' for model resnet18"),
    ({"model": "small_convnet", "lr": 0.01, "lr_schedule": "cosign"}, "unknown lr_schedule 'cosign'; known: "),
    ({"model": "small_convnet", "lr": -1.0}, "parameter 'lr' = -1.0"),
    ({"model": "small_convnet", "lr": 0.01, "batch_size": 1}, "parameter 'batch_size' = 1"),
    ({"model": "small_convnet"}, "the space sets no `lr`"),
])
def test_strict_parsing_names_the_culprit(flat, message):
    with pytest.raises(UserInputError, match=message):
        ClassificationConfig.from_flat(flat, source="space.yaml")


def test_stored_configurations_parse_leniently():
    """A format-1 checkpoint may hold a parameter the old code silently ignored."""
    config = SegmentationConfig.from_flat({"model": "unet", "lr": 0.001, "weight_decy": 1e-4, "depth": 3},
                                          strict=False)
    assert config.model_kwargs == {"depth": 3} and config.weight_decay == 0.0


def test_segmentation_scale_has_one_default_for_training_and_prediction():
    from tune_cells.model_io import ModelSpec
    from tune_cells.models import create_model
    from tune_cells.segmentation import ImageSegmenter

    assert SegmentationConfig.model_fields["scale"].default == 0.5
    spec = ModelSpec("lung", "unet", ["a"], 3, 0, 64, [0.5] * 3, [0.2] * 3, {"model": "unet", "lr": 0.001, "depth": 3},
                     kind="segmentation")
    segmenter = ImageSegmenter(create_model("unet", num_classes=1, in_channels=3, depth=3), spec)
    assert segmenter.scale == 0.5


@pytest.mark.parametrize("text, kind, message", [
    ("  model: small_convnet\n  weight_decy: 0.001\n", CLASSIFICATION, "unknown parameter 'weight_decy'"),
    ("  model: unet\n  encoder: {choices: [resnet18, vgg16]}\n", SEGMENTATION, "'encoder' = 'vgg16' is not allowed"),
    ("  model: unet\n  loss: {choices: [bce, focal]}\n", SEGMENTATION, "unknown loss 'focal'; known: bce, dice"),
    ("  model: unet\n", CLASSIFICATION, "model unet is a segmentation model; this task is classification"),
    ("  model: small_convnet\n  dropout: {float: [0.1, 0.5]}\ninitial_points:\n  - {dropout: 0.2, lr: -1}\n",
     CLASSIFICATION, "parameter 'lr' = -1"),
    # a model's own keywords out of their range: every trial would fail, or build a network no machine holds
    ("  model: small_convnet\n  dropout: 1.5\n", CLASSIFICATION, "'dropout' = 1.5: must be a number from 0 to 0.99"),
    ("  model: small_convnet\n  width: {int: [16, 100000]}\n", CLASSIFICATION, "'width' = 100000: must be a number from 1"),
    ("  model: small_convnet\n  dropout: {float: [0.0, 1.0]}\n", CLASSIFICATION, "'dropout' = 1.0: must be"),  # an end
    ("  model: small_convnet\n  depth: 100\n", CLASSIFICATION, "'depth' = 100: must be a number from 1 to 8"),
    ("  model: small_convnet\n  seed: -1\n", CLASSIFICATION, "parameter 'seed' = -1"),
])
def test_check_space_refuses_what_no_trial_could_use(tmp_path, text, kind, message):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  lr: 0.01\n" + text)
    with pytest.raises(UserInputError, match=message):
        check_space(load_space(path), seed=0, kind=kind)


@pytest.mark.parametrize("task", task_names())
def test_every_task_default_space_passes_the_strict_preflight(task):
    """As the preflight sees it: fitted to the weights this machine can load (offline in tests)."""
    from tune_cells.space_weights import fit_space_to_weights

    spec = get_task(task)
    check_space(fit_space_to_weights(load_space(spec.default_space)), seed=0, kind=spec.kind)


@pytest.mark.parametrize("name", ["nuclei-pretrained", "hep2-pretrained", "hep2-mobilenet-pretrained",
                                  "lung-pretrained", "folder-pretrained", "nuclei", "hep2", "leukemia", "folder"])
def test_every_pretrained_space_passes_where_its_weights_are_cached(name, monkeypatch):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "weights"
    if shared.is_dir():
        monkeypatch.setenv("TORCH_HOME", str(shared))
    space = load_space(name)
    models = {p.get("model") for p in space.initial_points} | set(space.params["model"].get("choices", [])
                                                                  if isinstance(space.params["model"], dict)
                                                                  else [space.params["model"]])
    encoder = space.params.get("encoder") if isinstance(space.params.get("encoder"), str) else None
    if not all(pretrained_available(pretrained_arch(m, encoder)) for m in models if m):
        pytest.skip("its ImageNet weights are not in the torch cache")
    check_space(space, seed=0)


def test_params_lists_every_searchable_parameter_with_its_default(run_cli):
    result = run_cli("params", "nuclei")
    assert result.code == 0, result.err
    for expected in ("lr ", "required", "optimizer", "[adamw, sgd]", "label_smoothing", "model small_convnet",
                     "depth", "model resnet18", "pretrained"):
        assert expected in result.out
    assert "unet" not in result.out  # a segmentation model is no choice for a classification task
    lung = run_cli("params", "lung")
    assert "scale             0.5" in lung.out and "[mobilenet_v2, resnet18, resnet34]" in lung.out
    assert "'validation'  at promotion" in lung.out and "[validation, one_se, fixed]" in lung.out  # columns apart
