"""Model registry and factory (timm style): each builder is registered with its facts
(`@register_model` / `@register_backbone`) and built by `create_model(name, ...)`.

A builder takes `num_classes`, `in_channels` and its own keyword hyperparameters (its signature is
the list of what it accepts); `select_hyperparameters` picks those from a flat trial config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune_cells.errors import UserInputError

# Builder arguments set by the factory, not searched.
_FACTORY_ARGUMENTS = ("num_classes", "in_channels", "load_weights")
# Bounds of the builders' numeric keywords, by name (one meaning in every builder): the preflight
# refuses a space outside them, where the builder would fail in every trial (dropout 1.5) or build a
# network no machine holds (width 100000). Closed intervals.
KEYWORD_RANGES: dict[str, tuple[float, float]] = {
    "dropout": (0.0, 0.99), "depth": (1, 8), "width": (1, 1024), "base_width": (1, 512)}
# A trial's share of one GPU when its model declares none: Ray packs trials by these fractions.
_DEFAULT_GPU_SHARE = 0.5

# Installs a new `num_classes` head (with dropout) on a torchvision network, in place.
HeadBuilder = Callable[[nn.Module, int, float], None]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    kind: str  # the task kind served: "classification" or "segmentation"
    gpu_share: float  # default share of one GPU per trial (small cell models leave most of a GPU idle)
    weights: str | None = None  # torchvision weights enum name; None: no ImageNet weights
    first_conv: str | None = None  # module path of the first conv, replaced for non-RGB input
    head: HeadBuilder | None = None  # torchvision backbones only; other builders build their own
    description: str = ""  # the builder docstring's first paragraph, on one line
    # Hyperparameters with a fixed set of values (checked by the preflight); a callable is asked
    # when needed, so a set filled by later registrations (U-Net encoders) is complete.
    allowed: dict[str, tuple] | Callable[[], dict[str, tuple]] = field(default_factory=dict)
    min_image_size: int = 0  # smaller inputs collapse its feature maps (the preflight refuses them)
    # Names a conflict between its hyperparameters (None: none); the preflight and the factory refuse it.
    conflict: Callable[[dict[str, Any]], str | None] | None = None

    @property
    def choices(self) -> dict[str, tuple]:
        return self.allowed() if callable(self.allowed) else self.allowed

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The builder's searchable keywords and their defaults."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in params if p.name not in _FACTORY_ARGUMENTS}


_REGISTRY: dict[str, ModelEntry] = {}
# U-Net encoders (smp names torchvision's networks alike) → their torchvision weights enum name.
_ENCODERS: dict[str, str] = {}


def register_model(*, kind: str = "classification", gpu_share: float = _DEFAULT_GPU_SHARE, weights: str | None = None,
                   first_conv: str | None = None, head: HeadBuilder | None = None, choices=None,
                   min_image_size: int = 0, conflict: Callable[[dict[str, Any]], str | None] | None = None):
    """Register the decorated builder under its function name, with its facts."""
    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if not 0 < gpu_share <= 1:
            raise ValueError(f"model {name!r}: gpu_share {gpu_share} is not in (0, 1]")
        description = " ".join((inspect.getdoc(builder) or "").partition("\n\n")[0].split())  # first paragraph
        _REGISTRY[name] = ModelEntry(name, builder, kind, gpu_share, weights, first_conv, head, description,
                                     choices or {}, min_image_size, conflict)
        return builder

    return register


def register_backbone(*, weights: str, first_conv: str | None = None, head: HeadBuilder | None = None,
                      gpu_share: float = _DEFAULT_GPU_SHARE, unet_encoder: bool = False, min_image_size: int = 0,
                      choices=None, conflict: Callable[[dict[str, Any]], str | None] | None = None):
    """Register a torchvision classifier named as torchvision's constructor. Its head and first
    conv must be declared: a default head would silently give a new backbone the wrong network."""
    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        missing = [fact for fact, value in (("head", head), ("first_conv", first_conv)) if value is None]
        if missing:
            raise ValueError(f"torchvision backbone {builder.__name__!r} is registered without {' and '.join(missing)}")
        if unet_encoder:
            register_encoder(builder.__name__, weights=weights)
        return register_model(gpu_share=gpu_share, weights=weights, first_conv=first_conv, head=head,
                              min_image_size=min_image_size, choices=choices, conflict=conflict)(builder)

    return register


def register_encoder(name: str, *, weights: str) -> None:
    """Make torchvision network `name` available as a U-Net encoder, with its ImageNet weights."""
    _ENCODERS[name] = weights


def get_model(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise UserInputError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return _REGISTRY[name]


def model_names(kind: str | None = None) -> list[str]:
    return sorted(name for name, entry in _REGISTRY.items() if kind is None or entry.kind == kind)


def model_defaults(name: str) -> dict[str, Any]:
    return dict(get_model(name).hyperparameters)


def gpu_share(name: str) -> float:
    return _REGISTRY[name].gpu_share if name in _REGISTRY else _DEFAULT_GPU_SHARE


def unet_encoders() -> list[str]:
    return sorted(_ENCODERS)


def select_hyperparameters(name: str, config: dict) -> dict[str, Any]:
    """The keys of a flat trial config (which also holds trainer settings) that model `name` takes."""
    declared = get_model(name).hyperparameters
    return {key: value for key, value in config.items() if key in declared}


def create_model(name: str, *, num_classes: int, in_channels: int, load_weights: bool = True,
                 **hyperparameters) -> nn.Module:
    """`load_weights=False` builds a pretrained configuration's exact architecture without fetching
    ImageNet weights (a checkpoint's own state_dict is loaded next). An undeclared keyword is an
    error: silently dropping it would train a model other than the one asked for."""
    entry = get_model(name)
    declared = entry.hyperparameters
    for key in sorted(hyperparameters):
        if key not in declared:
            raise UserInputError(f"model {name!r} takes no parameter {key!r}; its parameters: {', '.join(sorted(declared))}")
    problem = entry.conflict(hyperparameters) if entry.conflict else None
    if problem:
        raise UserInputError(f"model {name!r}: {problem}")
    if "load_weights" in inspect.signature(entry.builder).parameters:
        hyperparameters["load_weights"] = load_weights
    return entry.builder(num_classes=num_classes, in_channels=in_channels, **hyperparameters)


# --- ImageNet weights ---------------------------------------------------------------------


def _weights_name(arch: str) -> str | None:
    entry = _REGISTRY.get(arch)
    return entry.weights if entry else _ENCODERS.get(arch)


def has_pretrained_weights(arch: str) -> bool:
    return _weights_name(arch) is not None


def pretrained_architectures() -> list[str]:
    """torchvision networks whose ImageNet weights tune-cells can load (classifiers and U-Net encoders)."""
    return sorted({name for name in [*_REGISTRY, *_ENCODERS] if has_pretrained_weights(name)})


def pretrained_arch(model: str, encoder: str | None = None) -> str:
    """The torchvision network whose ImageNet weights a config asks for: a U-Net's encoder (its
    builder's default when none is given), otherwise the model itself."""
    defaults = _REGISTRY[model].hyperparameters if model in _REGISTRY else {}
    return (encoder or defaults["encoder"]) if "encoder" in defaults else model


def _weights_enum(arch: str):
    from torchvision import models as tvm  # lazily: importing torchvision is slow

    if not has_pretrained_weights(arch):
        raise UserInputError(f"{arch} has no pretrained weights")
    return getattr(tvm, _weights_name(arch))


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
            "download it on a machine with internet, or set TORCH_HOME to a cache that has it") from None
    return weights


def cached_pretrained_architectures() -> list[str]:
    """Which ImageNet backbones this machine's torch cache can load (logged with every search)."""
    return [arch for arch in pretrained_architectures() if pretrained_available(arch)]


def pretrained_available(arch: str) -> bool:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return any((checkpoints / Path(w.url).name).exists() for w in _weights_enum(arch))


def weights_url(arch: str) -> str:
    """Where torchvision downloads `arch`'s default ImageNet weights from."""
    return _weights_enum(arch).DEFAULT.url


def expected_weights_file(arch: str) -> Path:
    """Where torchvision looks for `arch`'s default ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(arch)).name


# --- from scratch -------------------------------------------------------------------------


@register_model(gpu_share=0.25)
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
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(float(dropout)),
                         nn.Linear(channels, num_classes))


# --- torchvision backbones, optionally ImageNet-pretrained --------------------------------


def _adapt(model: nn.Module, in_channels: int, pretrained: bool, first_conv_path: str) -> nn.Module:
    """Fit the input channels: a new first conv from scratch; grey → 3 channels for pretrained."""
    if in_channels == 3:
        return model
    if pretrained:  # ImageNet filters expect RGB: repeat the grey channel rather than retrain them
        return nn.Sequential(_RepeatChannels(3), model)
    parent_path, _, attr = first_conv_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old: nn.Conv2d = getattr(parent, attr)
    setattr(parent, attr, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                    bias=old.bias is not None))
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

    entry = _REGISTRY[arch]
    weights = _pretrained_weights(_weights_enum(arch), arch) if pretrained and load_weights else None
    model = getattr(tvm, arch)(weights=weights)
    if freeze_features:
        for param in model.parameters():
            param.requires_grad = False
    backbone = {id(param) for param in model.parameters()}
    entry.head(model, num_classes, float(dropout))  # installed after freezing: the head stays trainable
    for param in model.parameters():  # the new head, which `backbone_lr_scale` leaves at the full rate
        if id(param) not in backbone:
            param.is_new_head = True
    return _adapt(model, in_channels, bool(pretrained), entry.first_conv)


def _resnet_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))


RESNET_STEMS = ("imagenet", "small")


def _stem_conflict(kwargs: dict[str, Any]) -> str | None:
    if kwargs.get("stem") == "small" and kwargs.get("pretrained"):
        return "stem 'small' is a new, untrained first layer and cannot take ImageNet weights (pretrained: true)"
    return None


def _resnet(arch: str, stem: str, *args) -> nn.Module:
    """A torchvision ResNet; stem `small` (CIFAR-style: a 3x3 stride-1 conv, no max-pool) keeps 4x the
    resolution, so 64 px ends in an 8x8 map at the last stage where the ImageNet stem leaves 2x2."""
    if stem not in RESNET_STEMS:
        raise UserInputError(f"{arch}: unknown stem {stem!r}; known: {', '.join(RESNET_STEMS)}")
    model = _torchvision_classifier(arch, *args)
    if stem == "small":  # after _adapt, so a grey input keeps its channel count
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


_RESNET_FACTS = dict(first_conv="conv1", head=_resnet_head, choices={"stem": RESNET_STEMS}, conflict=_stem_conflict)


@register_backbone(weights="ResNet18_Weights", gpu_share=0.25, unet_encoder=True, **_RESNET_FACTS)
def resnet18(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.0,
             stem: str = "imagenet", load_weights: bool = True):
    """ResNet-18 (torchvision) with a new dropout + linear head; from scratch, optionally a small-input stem."""
    return _resnet("resnet18", stem, num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


@register_backbone(weights="ResNet50_Weights", gpu_share=0.5, **_RESNET_FACTS)
def resnet50(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.0,
             stem: str = "imagenet", load_weights: bool = True):
    """ResNet-50 (torchvision) with a new dropout + linear head; from scratch, optionally a small-input stem."""
    return _resnet("resnet50", stem, num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


def _mobilenet_v2_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.last_channel, num_classes))


@register_backbone(weights="MobileNet_V2_Weights", first_conv="features.0.0", head=_mobilenet_v2_head, gpu_share=0.25,
                   unet_encoder=True)
def mobilenet_v2(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.2,
                 load_weights: bool = True):
    """MobileNetV2 (torchvision) with a new dropout + linear head."""
    return _torchvision_classifier("mobilenet_v2", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


def _alexnet_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    # dropout + ReLU + linear on the pooled features, as in the HEp-2 recipe
    model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 512), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_classes))


# AlexNet's strided stem leaves a 1x1 map before its 6x6 pooling at 78 px; the HEp-2 recipe fed it 224 px.
@register_backbone(weights="AlexNet_Weights", first_conv="features.0", head=_alexnet_head, gpu_share=0.5,
                   min_image_size=224)
def alexnet(num_classes: int, in_channels: int, pretrained: bool = False, freeze_features: bool = False, dropout: float = 0.5,
            load_weights: bool = True):
    """AlexNet (torchvision) with the HEp-2 recipe's two-layer head."""
    return _torchvision_classifier("alexnet", num_classes, in_channels, pretrained, freeze_features, dropout, load_weights)


# --- segmentation -------------------------------------------------------------------------

register_encoder("resnet34", weights="ResNet34_Weights")  # an encoder only: no resnet34 classifier


@register_model(kind="segmentation", gpu_share=0.5,
                choices=lambda: {"encoder": tuple(unet_encoders()), "depth": (3, 4, 5)})
def unet(num_classes: int, in_channels: int, encoder: str = "resnet18", depth: int = 4, base_width: int = 16,
         pretrained: bool = False, load_weights: bool = True):
    """U-Net from segmentation-models-pytorch: `depth` encoder stages and a decoder whose widths
    double from `base_width` at full resolution; one output channel per target (multi-label).

    A pretrained encoder takes torchvision's ImageNet weights from the torch cache (smp's encoders
    are torchvision networks, so the state dicts match), never smp's own download.
    """
    import segmentation_models_pytorch as smp

    if encoder not in _ENCODERS:
        raise UserInputError(f"unknown U-Net encoder {encoder!r}; known: {', '.join(unet_encoders())}")
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
