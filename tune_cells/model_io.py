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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from tune_cells.errors import UserInputError
from tune_cells.models import create_model, select_hyperparameters
from tune_cells.transforms import EvalPreset

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"
TRAINER_FILE = "trainer.pt"  # epoch, RNG states, LR schedule, best metric so far
OPTIMIZER_FILE = "optimizer.pt"  # only in full checkpoints
MODEL_FORMAT = 2
TTA_MODES = ("none", "dihedral")


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
        if self.members:
            raise UserInputError(f"{directory}: a fold ensemble has one network per member (load_members)")
        model = self.build()
        model.load_state_dict(torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return model.to(device).eval()

    def load_members(self, directory: Path, device: str | torch.device = "cpu") -> list[torch.nn.Module]:
        """Every network of the model: its fold members' (each a checkpoint folder of its own), or its one."""
        if not self.members:
            return [self.load_network(directory, device)]
        return [load_spec(Path(directory) / member).load_network(Path(directory) / member, device)
                for member in self.members]


def spec_from_json(document: dict, source: str = SPEC_FILE) -> ModelSpec:
    """A spec of any format this version reads; newer formats and unknown fields are refused."""
    version = int(document.get("format", 1))
    if version > MODEL_FORMAT:
        raise UserInputError(f"{source}: model format {version} is newer than this tune-cells reads "
                             f"({MODEL_FORMAT}); upgrade tune-cells")
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise UserInputError(f"{source}: unknown model field {unknown[0]!r} for format {version}")
    spec = ModelSpec(**document)
    if spec.tta not in TTA_MODES:
        raise UserInputError(f"{source}: tta {spec.tta!r}; known: {', '.join(TTA_MODES)}")
    return spec


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
    path = Path(directory) / SPEC_FILE
    return spec_from_json(json.loads(path.read_text()), str(path))


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


