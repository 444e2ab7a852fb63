"""The task kinds (classification, segmentation): looked up by name, never compared as strings."""

from __future__ import annotations

from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.kinds.base import TaskKind, TrialInputs
from tune_cells.kinds.classification import CLASSIFICATION
from tune_cells.kinds.segmentation import SEGMENTATION

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (CLASSIFICATION, SEGMENTATION)}
# Where a registered model runs for predict, serve, evaluate, explain and export's parity check (all
# load it through `load_predictor`): promotion measures latency here too, so a budget means this device.
PREDICTION_DEVICE = "cpu"

__all__ = ["CLASSIFICATION", "KINDS", "PREDICTION_DEVICE", "SEGMENTATION", "TaskKind", "TrialInputs", "get_kind", "load_predictor"]


def get_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise UserInputError(f"unknown task kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def load_predictor(directory: Path, device: str = PREDICTION_DEVICE):
    """A checkpoint's predictor, by the kind its spec names."""
    from tune_cells.model_io import SPEC_FILE, load_spec

    kind = load_spec(directory).kind
    if kind not in KINDS:
        raise UserInputError(f"{Path(directory) / SPEC_FILE}: kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind].load_predictor(directory, device)
