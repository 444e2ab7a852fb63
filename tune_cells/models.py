"""Model registry and factory (timm style): `@register_model` builders, `create_model(name, ...)`.

A builder takes `num_classes`, `in_channels` and its own keyword hyperparameters; `create_model`
passes each builder only the hyperparameters it declares, so one flat trial config serves all.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tune_cells.errors import UserInputError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _BUILDERS[builder.__name__] = builder
    return builder


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def model_hyperparameters(name: str) -> set[str]:
    params = inspect.signature(_builder(name)).parameters
    return {p for p in params if p not in ("num_classes", "in_channels", "load_weights")}


# Default share of one GPU per trial: small cell models leave most of a GPU idle, so several
# trials share one (Ray packs them by these fractions). Used when --gpus-per-trial is not given.
GPU_SHARE = {"unet": 0.5, "small_convnet": 0.25, "resnet18": 0.25, "mobilenet_v2": 0.25, "alexnet": 0.5, "resnet50": 0.5}


def gpu_share(name: str) -> float:
    return GPU_SHARE.get(name, 0.5)


def create_model(name: str, *, num_classes: int, in_channels: int, load_weights: bool = True, **config) -> nn.Module:
    """`load_weights=False` builds a pretrained configuration's exact architecture without fetching
    ImageNet weights (a checkpoint's own state_dict is loaded next)."""
    builder = _builder(name)
    kwargs = {k: v for k, v in config.items() if k in model_hyperparameters(name)}
    if "load_weights" in inspect.signature(builder).parameters:
        kwargs["load_weights"] = load_weights
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise UserInputError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return _BUILDERS[name]


# --- from scratch -------------------------------------------------------------------------


@register_model
def small_convnet(num_classes: int, in_channels: int, depth: int = 3, width: int = 32, dropout: float = 0.2):
    """VGG-style stages (2× conv-BN-ReLU, max-pool), channel width doubling per stage."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(int(depth)):
        out = int(width) * 2**stage
        for _ in range(2):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(float(dropout)),
        nn.Linear(channels, num_classes),
    )


# --- torchvision backbones, optionally ImageNet-pretrained --------------------------------


def _pretrained_weights(weights_enum, arch: str):
    """ImageNet weights from the torch cache (any variant already there), else downloaded.

    Offline, a missing file is a user error naming the file, not a socket traceback.
    """
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in weights_enum:
        if (checkpoints / Path(weights.url).name).exists():
            return weights
    weights = weights_enum.DEFAULT
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket timeouts, hash mismatch: all mean "not available"
        raise UserInputError(
            f"pretrained {arch} needs {checkpoints / Path(weights.url).name} ({type(exc).__name__} downloading it): "
            "download it on a machine with internet, or set TORCH_HOME to a cache that has it"
        ) from None
    return weights


def pretrained_available(arch: str) -> bool:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return any((checkpoints / Path(w.url).name).exists() for w in _weights_enum(arch))


def expected_weights_file(arch: str) -> Path:
    """Where torchvision looks for `arch`'s default ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_weights_enum(arch).DEFAULT.url).name


def has_pretrained_weights(name: str) -> bool:
    return name in _WEIGHT_ENUMS


def _adapt(model: nn.Module, in_channels: int, pretrained: bool, first_conv_path: str) -> nn.Module:
    """Fit the input channels: a new first conv from scratch; grey → 3 channels for pretrained."""
    if in_channels == 3:
        return model
    if pretrained:  # ImageNet filters expect RGB: repeat the grey channel rather than retrain them
        return nn.Sequential(_RepeatChannels(3), model)
    parent_path, _, attr = first_conv_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old: nn.Conv2d = getattr(parent, attr)
    setattr(
        parent,
        attr,
        nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None),
    )
    return model


class _RepeatChannels(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.expand(-1, self.channels, -1, -1)


def _torchvision_classifier(arch, num_classes, in_channels, pretrained, freeze_features, dropout, load_weights=True):
    """`pretrained` shapes the network (a grey input is repeated to RGB for ImageNet filters);
    `load_weights` fetches the ImageNet weights, skipped when a checkpoint's state_dict follows."""
    from torchvision import models as tvm

    weights = _pretrained_weights(_weights_enum(arch), arch) if pretrained and load_weights else None
    model = getattr(tvm, arch)(weights=weights)
    if freeze_features:
        for param in model.parameters():
            param.requires_grad = False
    # A new classifier head (trainable even when features are frozen).
    if arch.startswith("resnet"):
        model.fc = nn.Sequential(nn.Dropout(float(dropout)), nn.Linear(model.fc.in_features, num_classes))
        first = "conv1"
    elif arch == "mobilenet_v2":
        model.classifier = nn.Sequential(nn.Dropout(float(dropout)), nn.Linear(model.last_channel, num_classes))
        first = "features.0.0"
    else:  # alexnet: dropout + ReLU + linear on the pooled features, as in the HEp-2 recipe
        model.classifier = nn.Sequential(
            nn.Dropout(float(dropout)), nn.Linear(256 * 6 * 6, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        first = "features.0"
    return _adapt(model, in_channels, bool(pretrained), first)


# torchvision's weight enums by architecture (looked up lazily: torchvision imports are slow).
_WEIGHT_ENUMS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "mobilenet_v2": "MobileNet_V2_Weights",
    "alexnet": "AlexNet_Weights",
}


def _weights_enum(arch: str):
    from torchvision import models as tvm

    return getattr(tvm, _WEIGHT_ENUMS[arch])


@register_model
def resnet18(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.0,
             load_weights: bool = True):
    return _torchvision_classifier("resnet18", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


@register_model
def resnet50(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.0,
             load_weights: bool = True):
    return _torchvision_classifier("resnet50", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


@register_model
def mobilenet_v2(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.2,
                 load_weights: bool = True):
    return _torchvision_classifier("mobilenet_v2", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


@register_model
def alexnet(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.5,
            load_weights: bool = True):
    return _torchvision_classifier("alexnet", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


# --- segmentation -------------------------------------------------------------------------

UNET_ENCODERS = ("resnet18", "resnet34", "mobilenet_v2")


@register_model
def unet(num_classes: int, in_channels: int, encoder: str = "resnet18", depth: int = 4, base_width: int = 16,
         pretrained: bool = False, load_weights: bool = True):
    """U-Net from segmentation-models-pytorch: `depth` encoder stages and a decoder whose widths
    double from `base_width` at full resolution; one output channel per target (multi-label).

    A pretrained encoder takes torchvision's ImageNet weights from the torch cache (smp's encoders
    are torchvision networks, so the state dicts match), never smp's own download.
    """
    import segmentation_models_pytorch as smp

    if encoder not in UNET_ENCODERS:
        raise UserInputError(f"unknown U-Net encoder {encoder!r}; known: {', '.join(UNET_ENCODERS)}")
    depth = int(depth)
    if not 3 <= depth <= 5:
        raise UserInputError(f"U-Net depth {depth}: must be 3, 4 or 5")
    model = smp.Unet(encoder, encoder_weights=None, encoder_depth=depth, in_channels=in_channels,
                     decoder_channels=tuple(int(base_width) * 2**i for i in reversed(range(depth))),
                     classes=num_classes)
    if pretrained and load_weights:
        if in_channels != 3:
            raise UserInputError("a pretrained U-Net encoder needs RGB input")
        weights = _pretrained_weights(_weights_enum(encoder), encoder)
        state = weights.get_state_dict(progress=False)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}  # unused head
        model.encoder.load_state_dict(state)  # strict: every encoder weight must come from the file
    return model


def pretrained_arch(config: dict) -> str:
    """The torchvision network whose ImageNet weights a config asks for (a U-Net's encoder)."""
    return config.get("encoder", "resnet18") if config.get("model") == "unet" else config.get("model", "")


def pretrained_architectures() -> list[str]:
    """torchvision networks whose ImageNet weights tune-cells can load (classifiers and U-Net encoders)."""
    return list(_WEIGHT_ENUMS)
