"""A trained classifier and its preprocessing: the one prediction path of evaluate, predict and serving."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch

from tune_cells.data.images import decode_image
from tune_cells.model_io import ModelSpec, base64_image_file, load_spec
from tune_cells.training import predict_logits


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The eight flips and right-angle turns of a uint8 batch N×H×W×C (cells have no "up")."""
    turns = [np.ascontiguousarray(np.rot90(images, k, (1, 2))) for k in range(4)]
    return turns + [np.ascontiguousarray(t[:, :, ::-1]) for t in turns]


class ImageClassifier:
    """uint8 images or files in, class probabilities out (temperature and test-time augmentation
    as the model's spec says)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.preset = spec.preset()

    @classmethod
    def from_checkpoint(cls, directory: Path, device: str = "cpu") -> ImageClassifier:
        spec = load_spec(directory)
        return cls(spec.load_network(directory), spec, device)

    def predict_logits(self, images_uint8: np.ndarray) -> torch.Tensor:
        views = dihedral_views(images_uint8) if self.spec.tta == "dihedral" else [images_uint8]
        return torch.stack([predict_logits(self.model, view, self.preset, self.device) for view in views]).mean(0)

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        return torch.softmax(self.predict_logits(images_uint8) / self.spec.temperature, 1).numpy()

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
