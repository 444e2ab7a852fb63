"""A trained classifier and its preprocessing: the one prediction path of evaluate, predict and serving."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch

from tune_cells.data.images import decode_image
from tune_cells.errors import UserInputError
from tune_cells.model_io import SPEC_FILE, ModelSpec, base64_image_file, load_spec
from tune_cells.training import predict_logits


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The eight flips and right-angle turns of a uint8 batch N×H×W×C (cells have no "up")."""
    turns = [np.ascontiguousarray(np.rot90(images, k, (1, 2))) for k in range(4)]
    return turns + [np.ascontiguousarray(t[:, :, ::-1]) for t in turns]


class ProbabilityEnsemble(torch.nn.Module):
    """Fold members as one network (for attribution maps): the log of the mean of their
    temperature-scaled class probabilities."""

    def __init__(self, members: list[torch.nn.Module], temperature: float):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(member(x) / self.temperature, 1) for member in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


class ImageClassifier:
    """uint8 images or files in, class probabilities out: one network or a fold ensemble (the mean
    of its members' probabilities), with the temperature and test-time augmentation of its spec."""

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module], spec: ModelSpec,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.members = [m.to(self.device).eval() for m in (model if isinstance(model, list) else [model])]
        self.spec = spec
        self.preset = spec.preset()

    @classmethod
    def from_checkpoint(cls, directory: Path, device: str = "cpu") -> ImageClassifier:
        spec = load_spec(directory)
        if spec.store_size < 1:  # (0 is a segmenter's: it decodes each image at its own size)
            raise UserInputError(f"{Path(directory) / SPEC_FILE}: store_size {spec.store_size}: a classifier "
                                 "decodes images to a square of at least 1 px")
        return cls(spec.load_members(directory), spec, device)

    @property
    def model(self) -> torch.nn.Module:
        """One network whose softmax is the model's prediction (attribution maps need one)."""
        if len(self.members) == 1:
            return self.members[0]
        return ProbabilityEnsemble(self.members, self.spec.temperature)

    def member_logits(self, images_uint8: np.ndarray, only: int | None = None) -> list[torch.Tensor]:
        """Each member's logits, or member `only`'s (averaged over the test-time views when the
        spec asks for them)."""
        views = dihedral_views(images_uint8) if self.spec.tta == "dihedral" else [images_uint8]
        members = self.members if only is None else [self.members[only]]
        return [torch.stack([predict_logits(member, view, self.preset, self.device) for view in views]).mean(0)
                for member in members]

    def predict_logits(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Logits before the temperature (of a fold ensemble: the log of its mean probabilities)."""
        logits = self.member_logits(images_uint8)
        if len(logits) == 1:
            return logits[0]
        return torch.stack([torch.softmax(each, 1) for each in logits]).mean(0).clamp_min(1e-12).log()

    def predict_proba(self, images_uint8: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Class probabilities: the mean over members of softmax(logits / T), T the spec's by default."""
        temperature = self.spec.temperature if temperature is None else temperature
        logits = self.member_logits(images_uint8)
        # float64: float32 rounds every confident image to exactly 1.0, and ROC AUC then sees ties
        return torch.stack([torch.softmax(each.double() / temperature, 1) for each in logits]).mean(0).numpy()

    def decode_path(self, path: str | Path) -> np.ndarray:
        """A local image file, decoded exactly as the training data was."""
        return self.decode_file(Path(path))

    def decode_base64(self, text: str) -> np.ndarray:
        """Base64-encoded image bytes (PNG, JPEG, TIFF, BMP), decoded exactly as the training data was."""
        return self.decode_file(base64_image_file(text))

    def decode_file(self, file: Path | BinaryIO) -> np.ndarray:
        """An image file or an open binary file object, decoded exactly as the training data was."""
        return decode_image(file, self.spec.channels, self.spec.store_size)

    def predict_table(self, images: list[np.ndarray]) -> pd.DataFrame:
        """Predicted class and per-class probabilities, one row per decoded image."""
        columns = ["predicted_class", *[f"prob_{c}" for c in self.spec.classes]]
        if not images:
            return pd.DataFrame(columns=columns)
        probs = self.predict_proba(np.stack(images))
        table = pd.DataFrame(probs, columns=columns[1:])
        table.insert(0, "predicted_class", [self.spec.classes[i] for i in probs.argmax(1)])
        return table
