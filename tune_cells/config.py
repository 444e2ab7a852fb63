"""Typed trial configurations: one class per task kind, each field with its default, range or
allowed values, and a one-line description.

A trial's configuration arrives from Optuna as one flat dict (what a space file samples). It splits
into the trainer's fields (declared here) and the model's keyword arguments (declared by the model
builder's signature in `tune_cells.models`). The preflight parses strictly: an unknown name or a value
outside its allowed set is a UserInputError naming it. Stored configurations (checkpoints of older
versions) parse leniently, so a model registered before a field was renamed still loads.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tune_cells.errors import UserInputError

log = logging.getLogger(__name__)


# Read at promotion, after the trials, never by a trial: a space fixes one value, and trials that differ
# only in them trained alike (`--warm-start` takes them as one point)
PROMOTION_FIELDS = frozenset({"ensemble", "ensemble_members"})


class TrainerConfig(BaseModel):
    """What every trial of every kind reads."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="network from the model registry (`tune-cells params TASK` lists them)")
    lr: float = Field(gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, le=1, description="decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    batch_size: int = Field(32, ge=2, le=4096, description="images (or views) per optimiser step")
    lr_schedule: Literal["constant", "cosine", "plateau"] = Field(
        "constant", description="per epoch: constant, cosine to lr x lr_floor, or x plateau_factor after "
        "plateau_patience epochs without a lower validation loss")
    lr_floor: float = Field(0.01, ge=0, lt=1, description="the cosine schedule ends at lr x this")
    plateau_factor: float = Field(0.3, gt=0, lt=1, description="plateau schedule: the rate is multiplied by this")
    plateau_patience: int = Field(2, ge=0, le=50, description="plateau schedule: epochs without a lower "
                                  "validation loss before the rate drops")
    color_jitter: float = Field(0.0, ge=0, le=1, description="strength of brightness/contrast/stain jitter")
    mixed_precision: Literal["auto"] | bool = Field("auto", description="bf16 autocast; auto: on CUDA only")
    channels_last: Literal["auto"] | bool = Field("auto", description="NHWC memory layout; auto: on CUDA only")
    warmup_epochs: int = Field(0, ge=0, le=20, description="linear LR warm-up over the first N epochs (cosine "
                               "and constant schedules)")
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="pretrained backbones train at lr x this; "
                                     "their new head at lr")
    checkpoint_every: int = Field(5, ge=1, description="full trainer state (optimiser too) every N epochs and at "
                                  "the last; weights alone whenever the metric improves")
    seed: int | None = Field(None, ge=0, description="trial seed [default: the search's --seed]")
    ensemble: int = Field(1, ge=1, le=8, description="the champion is promoted as the mean of N networks: itself "
                          "and N-1 other networks (`ensemble_members`)")
    ensemble_members: Literal["retrains", "trials"] = Field(
        "retrains", description="where an ensemble's other networks come from: retrains of the champion's "
        "configuration under other seeds (analysis/seed_ensemble.py), or the search's next-best trials that trained "
        "every epoch, at no extra training (analysis/trial_ensemble.py; retrains where too few did)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, exclude=True,
                                         description="the model builder's own keyword arguments")

    @classmethod
    def trainer_fields(cls) -> dict[str, Any]:
        return {name: info for name, info in cls.model_fields.items() if name != "model_kwargs"}

    @classmethod
    def from_flat(cls, flat: dict[str, Any], strict: bool = True, source: str = "trial configuration"):
        """Split a flat trial configuration into trainer fields and model keyword arguments.

        `strict`: a name that is neither, or a model argument the chosen model does not take, is an
        error; otherwise it is dropped with a debug line (stored configurations of older versions).
        """
        from tune_cells.models import get_model, model_defaults

        fields = cls.trainer_fields()
        trainer = {k: v for k, v in flat.items() if k in fields}
        rest = {k: v for k, v in flat.items() if k not in fields}
        model = trainer.get("model", fields["model"].default)
        if not isinstance(model, str):
            raise UserInputError(f"{source}: parameter 'model' must be a model name, not {model!r}")
        entry = get_model(model)
        declared = model_defaults(model)
        unknown = [k for k in rest if k not in declared]
        if unknown and strict:
            known = sorted([*fields, *declared])
            raise UserInputError(f"{source}: unknown parameter {unknown[0]!r} for model {model}; known: "
                                 f"{', '.join(known)}")
        if unknown:
            log.debug("%s: ignoring %s", source, ", ".join(unknown))
        kwargs = {k: v for k, v in rest.items() if k in declared}
        for name, allowed in entry.choices.items():
            if name in kwargs and kwargs[name] not in allowed:
                raise UserInputError(f"{source}: parameter {name!r} = {kwargs[name]!r} is not allowed; allowed: "
                                     f"{', '.join(map(str, allowed))}")
        problem = entry.conflict(kwargs) if entry.conflict else None
        if problem:
            raise UserInputError(f"{source}: model {model}: {problem}")
        try:
            return cls.model_validate({**trainer, "model_kwargs": kwargs})
        except ValidationError as exc:
            raise UserInputError(f"{source}: {_first_problem(exc, cls)}") from None

    def to_flat(self) -> dict[str, Any]:
        """The flat form stored in a checkpoint's spec and logged as MLflow params."""
        values = self.model_dump(exclude_none=True)
        return {**values, **self.model_kwargs}


    @classmethod
    def allowed_values(cls, name: str) -> tuple:
        """The values a field with a fixed set of choices allows (empty for open ranges)."""
        def literals(annotation) -> list:
            if get_origin(annotation) is Literal:
                return list(get_args(annotation))
            return [v for arg in get_args(annotation) for v in literals(arg)]

        field = cls.model_fields.get(name)
        return tuple(literals(field.annotation)) if field is not None else ()


def _first_problem(exc: ValidationError, config_type: type[TrainerConfig]) -> str:
    error = exc.errors()[0]
    name = ".".join(str(part) for part in error["loc"]) or "configuration"
    if error["type"] == "value_error" and not error["loc"]:  # a check across fields: its own words
        return str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"the space sets no `{name}`"
    allowed = config_type.allowed_values(name)
    if error["type"] == "literal_error" and allowed:
        return f"unknown {name} {error.get('input')!r}; known: {', '.join(map(str, allowed))}"
    return f"parameter {name!r} = {error.get('input')!r}: {error['msg']}"


class ClassificationConfig(TrainerConfig):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training loss only")
    flip: bool = Field(True, description="random horizontal and vertical flips")
    rotate90: bool = Field(True, description="random right-angle turns (cells have no 'up')")
    affine: float = Field(0.0, ge=0, le=1, description="strength of random rotation, scale and shear")
    image_size: int | None = Field(None, ge=8, description="network input side [default: the task's "
                                                                    "decoded size]")
    class_balance: Literal["none", "loss", "sampler"] = Field(
        "none", description="unequal classes: inverse-frequency weights in the training loss, or balanced "
                            "sampling of training images (validation and selection are unchanged)")


class SegmentationConfig(TrainerConfig):
    model: str = Field("unet", description="network from the model registry")
    batch_size: int = Field(4, ge=1, le=512, description="views per optimiser step")
    loss: Literal["bce", "dice", "bce_dice"] = Field("bce_dice", description="multi-label BCE, soft Dice, or both")
    scale: float = Field(0.5, gt=0, le=1, description="images are worked on at this fraction of their size")
    tile_size: int = Field(512, ge=32, le=4096, description="side of a training view and of a stitched tile, "
                                                            "in original pixels")
    overlap: float = Field(0.25, ge=0, lt=1, description="overlap of neighbouring tiles when stitching")
    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a pixel is a target's")
    threshold_choice: Literal["validation", "one_se", "fixed"] = Field(
        "validation", description="at promotion: each target's threshold chosen on the validation fields (the "
                                  "best; or one_se: the nearest `threshold` within one standard error of the best), "
                                  "or `threshold` for every target")
    tta_choice: Literal["validation", "always", "never"] = Field(
        "validation", description="at promotion: test-time augmentation (the mean over 8 flips and turns) where it "
                                  "gains on validation, always, or never; under --max-latency-ms only where 8 "
                                  "passes fit the budget")
    views_per_epoch: int = Field(32, ge=1, le=100000, description="random views drawn per training epoch")
    dihedral: bool = Field(True, description="random flips and right-angle turns of views")
    focus_rate: float = Field(0.0, ge=0, le=1, description="share of training views centred on a pixel of the "
                                                            "rarest target (uniform views otherwise)")
    batchnorm_views: int = Field(0, ge=0, le=100000, description="training views over which BatchNorm statistics are "
                                                                  "recomputed before each validation (precise BN; 0: "
                                                                  "the running averages of training)")
    swa_start: float | None = Field(None, ge=0, lt=1, description="stochastic weight averaging: the weights after each "
                                    "epoch past this fraction of the search's max epochs join an equal average, "
                                    "which validates, is checkpointed and promoted (None: off; needs "
                                    "batchnorm_views)")
    swa_lr: float | None = Field(None, gt=0, le=1, description="with swa_start: from the first averaged epoch the "
                                 "learning rate holds at lr x this (SWA's constant rate) instead of following "
                                 "its schedule (None: the schedule runs on)")

    @model_validator(mode="after")
    def _average_needs_fresh_batchnorm(self):
        if self.swa_start is not None and not self.batchnorm_views:
            raise ValueError("swa_start needs batchnorm_views > 0: an average of weights needs its BatchNorm "
                             "statistics recomputed")
        if self.swa_lr is not None and self.swa_start is None:
            raise ValueError("swa_lr needs swa_start: the rate holds from the first averaged epoch")
        return self


def first_averaged_epoch(swa_start: float, max_epochs: int) -> int:
    """The first epoch whose weights join the average: the first past `swa_start` of `max_epochs`."""
    return math.floor(swa_start * max_epochs) + 1


def parameter_table(config_type: type[TrainerConfig], kind: str) -> str:
    """`tune-cells params`: the trainer's fields, then each model of the kind with its own."""
    from tune_cells.models import get_model, model_names

    rows = ["trainer:"]
    fields = describe_fields(config_type)
    width = max(len(default) for _, default, _ in fields) + 2  # 'validation' and longer defaults stay apart
    for name, default, description in fields:
        allowed = config_type.allowed_values(name)
        values = f" [{', '.join(map(str, allowed))}]" if len(allowed) > 1 else ""
        rows.append(f"  {name:<18}{default:<{width}}{description}{values}")
    for model in model_names(kind):
        entry = get_model(model)
        rows.append(f"\nmodel {model}: {entry.description}")
        for name, default in entry.hyperparameters.items():
            allowed = entry.choices.get(name)
            rows.append(f"  {name:<18}{default!r}" + (f" [{', '.join(map(str, allowed))}]" if allowed else ""))
    return "\n".join(rows)


def describe_fields(config_type: type[TrainerConfig]) -> list[tuple[str, str, str]]:
    """(name, default, description) of every trainer field, for `tune-cells params`."""
    rows = []
    for name, info in config_type.trainer_fields().items():
        default = "required" if info.is_required() else repr(info.default)
        rows.append((name, default, info.description or ""))
    return rows
