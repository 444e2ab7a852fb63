"""Checkpoints (state_dict + JSON spec) and the one prediction path used by evaluate, predict and serving.

No pickled modules anywhere: the network is rebuilt through the model factory from the JSON
spec and its weights are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tune_cells.data.images import decode_image
from tune_cells.models import create_model
from tune_cells.training import predict_logits
from tune_cells.transforms import EvalPreset

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"
TRAINER_FILE = "trainer.pt"


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
    config: dict = field(default_factory=dict)  # the trial's full configuration
    format: int = 1
    kind: str = "classification"  # or "segmentation" (classes are then the mask targets)

    def preset(self) -> EvalPreset:
        return EvalPreset(self.image_size, tuple(self.mean), tuple(self.std))

    def build(self, load_pretrained: bool = False) -> torch.nn.Module:
        """The network, always in the architecture it was trained in (a pretrained network on grey
        input repeats it to RGB); ImageNet weights are fetched only for training, since a
        checkpoint's state_dict replaces them."""
        return create_model(self.architecture, num_classes=len(self.classes), in_channels=self.channels,
                            load_weights=load_pretrained, **self.config)


def save_checkpoint(directory: Path, model: torch.nn.Module, spec: ModelSpec, trainer_state: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
    if trainer_state is not None:
        torch.save(trainer_state, directory / TRAINER_FILE)
    return directory


def load_spec(directory: Path) -> ModelSpec:
    return ModelSpec(**json.loads((Path(directory) / SPEC_FILE).read_text()))


def load_trainer_state(directory: Path) -> dict | None:
    path = Path(directory) / TRAINER_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def restore_training(checkpoint: Path, model: torch.nn.Module, optimizer, schedule, generator: torch.Generator,
                     device: torch.device) -> dict:
    """Load a trial's own checkpoint into its model, optimizer, LR schedule and generator (a
    resumed or retried trial continues where it stopped); returns the trainer state."""
    model.load_state_dict(torch.load(Path(checkpoint) / WEIGHTS_FILE, map_location=device, weights_only=True))
    state = load_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
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


def load_predictor(directory: Path, device: str = "cpu"):
    """The checkpoint's predictor: an ImageClassifier, or an ImageSegmenter for a segmentation model."""
    if load_spec(directory).kind == "segmentation":
        from tune_cells.segmentation import ImageSegmenter

        return ImageSegmenter.from_checkpoint(directory, device)
    return ImageClassifier.from_checkpoint(directory, device)


class ImageClassifier:
    """A trained classifier and its preprocessing: uint8 images or files in, probabilities out."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.preset = spec.preset()

    @classmethod
    def from_checkpoint(cls, directory: Path, device: str = "cpu") -> "ImageClassifier":
        spec = load_spec(directory)
        model = spec.build()
        state = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return cls(model, spec, device)

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        logits = predict_logits(self.model, images_uint8, self.preset, self.device)
        return torch.softmax(logits, 1).numpy()

    def decode_path(self, path: str | Path) -> np.ndarray:
        """A local image file, decoded exactly as the training data was."""
        return decode_image(Path(path), self.spec.channels, self.spec.store_size)

    def decode_base64(self, text: str) -> np.ndarray:
        """Base64-encoded image bytes (PNG, JPEG, TIFF...), decoded exactly as the training data was."""
        return decode_image(base64_image_file(text), self.spec.channels, self.spec.store_size)

    def predict_table(self, images: list[np.ndarray]) -> pd.DataFrame:
        """Predicted class and per-class probabilities, one row per decoded image."""
        columns = ["predicted_class", *[f"prob_{c}" for c in self.spec.classes]]
        if not images:
            return pd.DataFrame(columns=columns)
        probs = self.predict_proba(np.stack(images))
        table = pd.DataFrame(probs, columns=columns[1:])
        table.insert(0, "predicted_class", [self.spec.classes[i] for i in probs.argmax(1)])
        return table
