import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_cells.errors import UserInputError
from tune_cells.models import (
    create_model,
    get_model,
    model_defaults,
    model_names,
    pretrained_arch,
    register_backbone,
    select_hyperparameters,
    unet_encoders,
)

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


@pytest.mark.parametrize("name", ["small_convnet", "resnet18", "mobilenet_v2", "alexnet", "resnet50"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_builds_from_scratch_for_grey_and_rgb(name, channels):
    size = 64 if name != "alexnet" else 96
    config = {"depth": 2, "width": 8, "unrelated_key": 1}  # a flat trial config: each model takes its own keys
    model = create_model(name, num_classes=4, in_channels=channels, **select_hyperparameters(name, config))
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 4)


def test_registry_passes_only_declared_hyperparameters():
    assert {"small_convnet", "resnet18", "mobilenet_v2"} <= set(model_names())
    assert set(model_defaults("small_convnet")) == {"depth", "width", "dropout"}
    with pytest.raises(UserInputError, match="unknown model 'vgg99'"):
        create_model("vgg99", num_classes=2, in_channels=3)


def test_frozen_features_leave_only_the_new_head_trainable():
    model = create_model("resnet18", num_classes=3, in_channels=3, freeze_features=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fc.") for n in trainable)


def test_pretrained_offline_without_weights_is_a_clear_user_error(tmp_path):
    # A fresh process with an empty torch cache: torchvision must not be able to download.
    code = (
        "from tune_cells.models import create_model\n"
        "create_model('resnet18', num_classes=2, in_channels=3, pretrained=True)\n"
    )
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "UserInputError: pretrained resnet18 needs" in proc.stderr
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in proc.stderr


@pytest.mark.skipif(not (SHARED_WEIGHTS / "hub" / "checkpoints").is_dir(), reason="../shared/weights not present")
def test_pretrained_mobilenet_loads_offline_from_the_torch_cache(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(SHARED_WEIGHTS))
    model = create_model("mobilenet_v2", num_classes=4, in_channels=1, pretrained=True)
    # ImageNet filters kept (grey is repeated to RGB), a new 4-class head
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4)


def test_mixed_precision_and_channels_last_path_trains():
    """The CUDA-only speed path (bf16 autocast, channels-last), forced on here so the code runs."""
    import numpy as np
    import torch

    from tune_cells.models import create_model
    from tune_cells.training import Precision, predict_logits, train_one_epoch
    from tune_cells.transforms import EvalPreset, TrainPreset

    device = torch.device("cpu")
    precision = Precision.for_device(device, mixed_precision=True, channels_last=True)
    assert precision.autocast_dtype == torch.bfloat16 and precision.channels_last
    assert Precision.for_device(device) == Precision()  # auto: off without CUDA
    model = precision.prepare_model(create_model("small_convnet", num_classes=3, in_channels=3, depth=2, width=8))
    images = np.random.default_rng(0).integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    preset = TrainPreset(EvalPreset(24, (0.5,) * 3, (0.25,) * 3))
    loss, data_time = train_one_epoch(model, images, labels, torch.optim.SGD(model.parameters(), lr=0.01), preset, 4,
                                      torch.nn.CrossEntropyLoss(), device, torch.Generator().manual_seed(0), precision)
    assert np.isfinite(loss) and data_time >= 0
    logits = predict_logits(model, images, preset.eval_preset, device, precision=precision)
    assert logits.dtype == torch.float32 and logits.shape == (8, 3)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "alexnet"])
def test_a_pretrained_grey_model_is_rebuilt_in_its_trained_architecture(arch):
    """A checkpoint of a pretrained network on grey cells (hep2) must load into the network that
    evaluation, predict and serving rebuild without ImageNet weights."""
    from tune_cells.model_io import ModelSpec

    spec = ModelSpec("hep2", arch, ["a", "b"], 1, 78, 64, [0.5], [0.2], {"pretrained": True, "dropout": 0.3})
    trained = create_model(arch, num_classes=2, in_channels=1, pretrained=True, dropout=0.3, load_weights=False)
    rebuilt = spec.build()
    assert list(rebuilt.state_dict()) == list(trained.state_dict())
    rebuilt.load_state_dict(trained.state_dict())


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("channels", [1, 3])
def test_every_registered_model_builds_from_scratch(name, channels):
    entry = get_model(name)
    model = create_model(name, num_classes=4, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, channels, 64, 64))
    if name in model_names("segmentation"):
        assert out.shape == (2, 4, 64, 64)  # one logit map per target
    else:
        assert name in model_names("classification") and out.shape == (2, 4)
    assert entry.description


def test_a_torchvision_backbone_without_a_head_is_refused_at_registration():
    with pytest.raises(ValueError, match="'vgg11' is registered without head"):
        @register_backbone(weights="VGG11_Weights", first_conv="features.0")
        def vgg11(num_classes: int, in_channels: int):
            raise AssertionError("never built")
    assert "vgg11" not in model_names()


def test_create_model_refuses_an_undeclared_keyword():
    with pytest.raises(UserInputError, match="model 'resnet18' takes no parameter 'width'; its parameters: .*dropout"):
        create_model("resnet18", num_classes=2, in_channels=3, width=8)


def test_registry_facts_are_sound():
    import torchvision

    for name in model_names():
        entry = get_model(name)
        assert 0 < entry.gpu_share <= 1
        if entry.weights is not None:
            assert issubclass(getattr(torchvision.models, entry.weights), torchvision.models.WeightsEnum)
        if entry.head is not None:
            assert entry.first_conv
    assert unet_encoders() == ["mobilenet_v2", "resnet18", "resnet34"]
    assert model_defaults("unet") == {"encoder": "resnet18", "depth": 4, "base_width": 16, "pretrained": False}
    assert pretrained_arch("unet") == "resnet18" and pretrained_arch("unet", "resnet34") == "resnet34"
    assert pretrained_arch("alexnet") == "alexnet"


def test_select_hyperparameters_drops_trainer_settings():
    config = {"model": "unet", "lr": 0.01, "optimizer": "adamw", "loss": "dice", "encoder": "resnet34", "depth": 3}
    assert select_hyperparameters("unet", config) == {"encoder": "resnet34", "depth": 3}
    assert select_hyperparameters("small_convnet", config) == {"depth": 3}


def test_the_registry_registers_without_importing_torchvision():
    code = "import sys\nimport tune_cells.models as m\nassert m.model_names() and 'torchvision' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
