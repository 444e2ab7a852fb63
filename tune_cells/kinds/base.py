"""What a task kind is: everything that differs between classification and segmentation, behind
one interface, so no other module asks which kind it holds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tune_cells.config import TrainerConfig

if TYPE_CHECKING:  # annotations only
    import pandas as pd

    from tune_cells.analysis.evaluation_common import Evaluation, EvaluationContext, TestScorer
    from tune_cells.data.images import ImageIndex, ImageScan
    from tune_cells.data.reader import SplitReader
    from tune_cells.data.splits import Split


class TaskSpec(Protocol):
    """What a kind reads of a task (tune_cells.tasks.TaskSpec, which refers to kinds, not back)."""

    name: str
    channels: int


@dataclass(frozen=True)
class CardWording:
    """How a model card words what a kind's model gives ({n}: how many labels, {names}: their names,
    {task}: the task), what it is for, and where it stops."""

    labels: str  # the labels as a plural noun, where their names are unknown
    output: str
    use: str
    limit: str


@dataclass
class TrialInputs:
    trainable: Callable[..., None]  # the Ray Tune function trainable
    data: Any  # its decoded train/val data, shared with every trial through the object store
    metric_keys: tuple[str, ...]  # what each epoch reports, logged to the trial's MLflow run
    summary_keys: tuple[str, ...]  # what a finished trial's log line shows


class TaskKind(ABC):
    name: ClassVar[str]
    config_type: ClassVar[type[TrainerConfig]]
    label_noun: ClassVar[str]  # what `classes` are: "class" or "target"
    card_wording: ClassVar[CardWording]
    explainable: ClassVar[bool]  # attribution maps (`tune-cells explain`) make sense
    writes_masks: ClassVar[bool]  # `predict` writes masks and overlays beside its CSV

    def parse_config(self, flat: dict, strict: bool = True, source: str = "trial configuration") -> TrainerConfig:
        return self.config_type.from_flat(flat, strict=strict, source=source)

    # --- the search ----------------------------------------------------------------------

    @abstractmethod
    def decode_for_search(self, task: TaskSpec, index: ImageIndex, store_size: int) -> ImageScan:
        """Decode every image (and mask) once: its hash, and its pixels in the form training uses
        (`store_size`: the square side the preflight chose), by file path. All of them: the split,
        planned from the hashes, decides which are kept."""

    @abstractmethod
    def object_store_bytes(self, task: TaskSpec, index: ImageIndex, split: Split, store_size: int) -> int:
        """About how many bytes the decoded train/val data takes in Ray's object store."""

    @abstractmethod
    def trial_inputs(self, task: TaskSpec, index: ImageIndex, reader: SplitReader, max_epochs: int,
                     seed: int, folds: int = 1) -> TrialInputs:
        """Decode the train and validation parts once (at the reader's size), for this kind's
        trainable; with `folds` > 1 pooled and cut into that many folds (cross-validation inside
        each trial)."""

    @abstractmethod
    def fold_labels(self, index: ImageIndex, paths: list[str]):
        """What folds are stratified by (the class of each path), or None."""

    @abstractmethod
    def describe(self, index: ImageIndex) -> str:
        """The dataset in a few words for the search's log line."""

    @abstractmethod
    def part_counts(self, index: ImageIndex, split: Split) -> dict[str, dict[str, int]]:
        """Per split part, what it holds (images per class, or images)."""

    # --- the model -----------------------------------------------------------------------

    @abstractmethod
    def load_predictor(self, directory: Path, device: str = "cpu"):
        """The checkpoint's predictor (decode_path, decode_base64, decode_file, predict_table, spec)."""

    @abstractmethod
    def signature(self, classes: list[str]):
        """The MLflow model signature of the pyfunc model."""

    @abstractmethod
    def predict_files(self, predictor, names: list[str], images: list, mask_dir: Path) -> pd.DataFrame:
        """`tune-cells predict`'s table for decoded files (and masks in `mask_dir`, for segmentation)."""

    @abstractmethod
    def export_plan(self, predictor):
        """What `tune-cells export` makes of the predictor: the graph from normalised input to
        probabilities, its preprocessing contract and its parity check (tune_cells.export_kinds)."""

    # --- after the search ----------------------------------------------------------------

    def compares_with_recipe(self, data) -> bool:
        """Whether the one-SE rule (analysis.selection) chooses this kind's champion on `data`
        (TrialInputs.data); then ASHA lets the recipe run its whole budget (tune_cells.ray_scheduler)."""
        return False

    def selection_error(self, data, result) -> float | None:
        """The standard error of the best trial's validation score (`result`: Ray's SearchResult), the
        one-SE rule's margin; None: the rule does not apply."""
        return None

    @abstractmethod
    def finalize(self, checkpoint: Path, data, allow_tta: bool = True) -> dict[str, float | str]:
        """Choose on validation (`data`: the trials' TrialInputs.data) what the promoted model
        keeps beyond its weights, written into the checkpoint's spec; returns what was chosen and
        measured, with `validation_score`: the task metric of the model as it will predict.
        `allow_tta` False: no test-time augmentation (a latency budget it would break)."""

    @abstractmethod
    def evaluate(self, context: EvaluationContext) -> Evaluation:
        """Score a predictor on one part, log the evaluation run and its artifacts."""

    @abstractmethod
    def test_scorer(self, reader: SplitReader, n_boot: int) -> TestScorer:
        """Scores of any predictor of the task on the test part, decoded once (`evaluate --seeds`)."""
