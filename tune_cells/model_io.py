"""The model format: a checkpoint folder of weights (state_dict) and a JSON spec, versioned.

No pickled modules anywhere: the network is rebuilt through the model factory from the JSON
spec and its weights are loaded with `torch.load(weights_only=True)`.

Format 1 (before 0.2): the fields up to `kind`. Format 2 adds optional fields, each with a default
that reproduces a format-1 model, so every format-1 checkpoint loads unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from tune_cells.errors import UserInputError, first_line
from tune_cells.models import create_model, select_hyperparameters
from tune_cells.transforms import EvalPreset

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"
TRAINER_FILE = "trainer.pt"  # epoch, RNG states, LR schedule, best metric so far
OPTIMIZER_FILE = "optimizer.pt"  # only in full checkpoints
MODEL_FORMAT = 2
TTA_MODES = ("none", "dihedral")
# px: a spec with a larger square is damage. (A space may ask for more: that trial fails out of memory.)
MAX_SIDE = 8192


@dataclass
class ModelSpec:
    task: str
    architecture: str
    classes: list[str]
    channels: int
    store_size: int  # images are decoded to this square size first ...
    image_size: int  # ... then resized to this by the eval preset
    mean: list[float]
    std: list[float]
    config: dict = field(default_factory=dict)  # the trial's full flat configuration
    format: int = MODEL_FORMAT
    kind: str = "classification"  # the task kind's name (tune_cells.kinds); classes are then the targets
    # Format 2: each default reproduces a format-1 model.
    members: list[str] = field(default_factory=list)  # fold-ensemble member folders; empty: this folder's weights
    temperature: float = 1.0  # logits are divided by it before softmax/sigmoid (calibration)
    tta: str = "none"  # test-time augmentation: none, or dihedral (mean over the 8 flips and turns)
    thresholds: dict[str, float] = field(default_factory=dict)  # per segmentation target; else config threshold
    # First-layer variant the network was built with (a ResNet's `stem`), for readers of the spec; the
    # network itself is rebuilt from `config`, whose missing `stem` is the ImageNet stem of older models.
    input_stem: str = "default"

    def preset(self) -> EvalPreset:
        return EvalPreset(self.image_size, tuple(self.mean), tuple(self.std))

    def build(self, load_pretrained: bool = False) -> torch.nn.Module:
        """The network, always in the architecture it was trained in (a pretrained network on grey
        input repeats it to RGB); ImageNet weights are fetched only for training, since a
        checkpoint's state_dict replaces them."""
        return create_model(self.architecture, num_classes=len(self.classes), in_channels=self.channels,
                            load_weights=load_pretrained, **select_hyperparameters(self.architecture, self.config))

    def load_network(self, directory: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network with the checkpoint's weights, in eval mode (one model: see `load_members`)."""
        directory = Path(directory)
        if self.members:
            raise UserInputError(f"{directory}: a fold ensemble has one network per member (load_members)")
        try:
            model = self.build()
        except (UserInputError, TypeError, ValueError) as exc:  # an architecture or config no model takes
            raise UserInputError(f"{directory / SPEC_FILE}: cannot build its network ({first_line(str(exc)) or type(exc).__name__})") from None
        weights = directory / WEIGHTS_FILE
        state = read_weights(weights)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a class count the weights were not trained for
            raise UserInputError(f"{weights}: does not fit the network {SPEC_FILE} describes "
                                 f"({mismatch(exc)})") from None
        return model.to(device).eval()

    def load_members(self, directory: Path, device: str | torch.device = "cpu") -> list[torch.nn.Module]:
        """Every network of the model: its fold members' (each a checkpoint folder of its own), or its one."""
        if not self.members:
            return [self.load_network(directory, device)]
        directory = Path(directory)
        networks = []
        for member in self.members:
            folder = directory / member
            # A member is a folder inside the model's own (a link out of it is refused like '..').
            if not folder.resolve().is_relative_to(directory.resolve()) or not folder.is_dir():
                raise UserInputError(f"{directory / SPEC_FILE}: member {member!r} is no folder inside the model folder")
            spec = load_spec(folder)
            if (spec.classes, spec.channels, spec.kind) != (self.classes, self.channels, self.kind):
                raise UserInputError(f"{folder / SPEC_FILE}: classes, channels or kind differ from the "
                                     f"ensemble's {directory / SPEC_FILE}")
            networks.append(spec.load_network(folder, device))
        return networks


def read_weights(path: Path) -> dict:
    """A checkpoint's state_dict, or one line naming the file that is missing or damaged."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing (the model's weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways (KeyError, EOFError, RuntimeError, UnpicklingError)
        raise UserInputError(f"{path}: not a weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: not a weights file (a {type(state).__name__}, not a state_dict)")
    return state


def mismatch(exc: Exception) -> str:
    """The first problem of torch's multi-line 'Error(s) in loading state_dict for X:' (the header says none)."""
    lines = str(exc).splitlines()
    return first_line("\n".join(lines[1:]) if len(lines) > 1 else str(exc)) or type(exc).__name__


def spec_from_json(document, source: str = SPEC_FILE) -> ModelSpec:
    """A spec of any format this version reads, every field checked (type, range) before anything is
    built from it; newer formats, unknown or missing fields and damaged values are refused by name."""
    if not isinstance(document, dict):
        raise UserInputError(f"{source}: not a model spec (a JSON {json_type(document)}, not an object)")
    version = document.get("format", 1)
    if not is_int(version) or version < 1:
        raise UserInputError(f"{source}: format {shown(version)}: must be a model format number (1, 2, ...)")
    if version > MODEL_FORMAT:
        raise UserInputError(f"{source}: model format {version} is newer than this tune-cells reads "
                             f"({MODEL_FORMAT}); upgrade tune-cells")
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise UserInputError(f"{source}: unknown model field {unknown[0]!r} for format {version}")
    required = [f.name for f in fields(ModelSpec) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in document]
    if missing:
        raise UserInputError(f"{source}: no {missing[0]!r} field (required)")
    for name, value in document.items():
        problem = FIELD_CHECKS[name](value)
        if problem:
            raise UserInputError(f"{source}: {name} {shown(value)}: {problem}")
    spec = ModelSpec(**document)
    if spec.tta not in TTA_MODES:
        raise UserInputError(f"{source}: tta {spec.tta!r}; known: {', '.join(TTA_MODES)}")
    for name in ("mean", "std"):
        if len(getattr(spec, name)) != spec.channels:
            raise UserInputError(f"{source}: {name} has {len(getattr(spec, name))} values for {spec.channels} "
                                 "channel(s)")
    stray = sorted(set(spec.thresholds) - set(spec.classes))
    if stray:
        raise UserInputError(f"{source}: thresholds name {stray[0]!r}, which is not one of its classes")
    return spec


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no size


def is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)  # JSON's NaN and Infinity are read as floats
    except OverflowError:  # an integer too large for a float
        return False


def json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def shown(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_text(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def check_size(minimum: int):
    def check(value) -> str | None:
        return None if is_int(value) and minimum <= value <= MAX_SIDE else f"must be a whole number of px, {minimum} to {MAX_SIDE}"
    return check


def check_channels(value) -> str | None:
    return None if is_int(value) and value in (1, 3) else "must be 1 (grey) or 3 (RGB)"


def check_names(value) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        return "must be a list of one or more names"
    return None if len(set(value)) == len(value) else "names a class twice"


def check_numbers(positive: bool):
    def check(value) -> str | None:
        if not isinstance(value, list) or not value or not all(is_number(v) for v in value):
            return "must be a list of finite numbers"
        return "must be above 0 (inputs are divided by it)" if positive and min(value) <= 0 else None
    return check


def check_temperature(value) -> str | None:
    return None if is_number(value) and value > 0 else "must be a finite number above 0 (logits are divided by it)"


def check_members(value) -> str | None:
    """Fold members are folders directly inside the model folder: no path that could lead out of it."""
    if not isinstance(value, list):
        return "must be a list of member folder names"
    for member in value:
        if not isinstance(member, str) or member in ("", ".", "..") or any(c in member for c in "/\\\0"):
            return f"member {shown(member)} is not a folder name inside the model folder"
    return None if len(set(value)) == len(value) else "names a member twice"


def check_thresholds(value) -> str | None:
    if not isinstance(value, dict) or not all(is_number(v) and 0 <= v <= 1 for v in value.values()):
        return "must map targets to thresholds from 0 to 1"
    return None


def check_object(value) -> str | None:
    return None if isinstance(value, dict) else "must be a JSON object"


FIELD_CHECKS = {
    "task": check_text, "architecture": check_text, "classes": check_names, "channels": check_channels,
    "store_size": check_size(0),  # 0: a segmenter decodes at each image's own size (a classifier needs >= 1)
    "image_size": check_size(1), "mean": check_numbers(False), "std": check_numbers(True), "config": check_object,
    "format": lambda value: None, "kind": check_text, "members": check_members, "temperature": check_temperature,
    "tta": check_text, "thresholds": check_thresholds, "input_stem": check_text,
}


def save_checkpoint(directory: Path, model: torch.nn.Module, spec: ModelSpec, trainer_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Weights and spec (what promotion needs); the small trainer state (epoch, RNGs, schedule); the
    optimiser's state only when given (a full checkpoint: the optimiser is 1-2x the weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    save_spec(directory, spec)
    if trainer_state is not None:
        torch.save(trainer_state, directory / TRAINER_FILE)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    return directory


def save_spec(directory: Path, spec: ModelSpec) -> None:
    """Rewrite a checkpoint's spec (promotion adds what it chose on validation: temperature, tta)."""
    (Path(directory) / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))


def load_spec(directory: Path) -> ModelSpec:
    """A checkpoint folder's spec, or one line naming its model.json (missing, unreadable, not JSON, damaged)."""
    path = Path(directory) / SPEC_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserInputError(f"{path}: missing (the model's spec)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    return spec_from_json(document, str(path))


def strip_training_state(directory: Path) -> None:
    """Drop what only a resume needs (trainer and optimiser state, of every fold member) from a
    staged copy of a checkpoint: a registered model is its weights and spec."""
    for name in (TRAINER_FILE, OPTIMIZER_FILE):
        for path in Path(directory).rglob(name):
            path.unlink()


def load_trainer_state(directory: Path) -> dict | None:
    path = Path(directory) / TRAINER_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def restore_training(checkpoint: Path, model: torch.nn.Module, optimizer, schedule, generator: torch.Generator,
                     device: torch.device) -> dict:
    """Load a trial's own checkpoint into its model, optimizer, LR schedule and generator (a
    resumed or retried trial continues where it stopped); returns the trainer state. A checkpoint
    written for its weights alone (the metric improved between full checkpoints) restores everything
    but the optimiser's moments, which restart from zero."""
    checkpoint = Path(checkpoint)
    model.load_state_dict(torch.load(checkpoint / WEIGHTS_FILE, map_location=device, weights_only=True))
    state = load_trainer_state(checkpoint)
    optimizer_file = checkpoint / OPTIMIZER_FILE
    optimizer_state = state.get("optimizer")  # checkpoints before the split kept it in the trainer state
    if optimizer_file.exists():
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    else:
        log.warning("resuming at epoch %s from a weights-only checkpoint: the optimiser's moments restart",
                    int(state["epoch"]) + 1)
    if schedule is not None and state.get("schedule"):
        schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    return state


def base64_image_file(text: str) -> io.BytesIO:
    """The bytes behind a base64 string, as a file for PIL; bad base64 is a ValueError."""
    try:
        return io.BytesIO(base64.b64decode(text, validate=True))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"image is not valid base64 ({exc})") from None


