"""What every kind's held-out evaluation shares: its inputs, its result, and its MLflow run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tune_cells.analysis.metrics import too_few_groups
from tune_cells.paths import WorkDir


@dataclass
class Evaluation:
    run_id: str
    model_uri: str
    version: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # percentile bootstrap, every metric
    exact_accuracy: tuple[float, float] | None  # Clopper-Pearson (classification)
    n_images: int
    output_dir: Path | None = None  # masks, overlays and the pixel-count table (segmentation)
    ci_note: str = ""  # why there are no bootstrap intervals (too few groups), "" when there are


@dataclass
class EvaluationContext:
    """One evaluation of a registered version on one part (the test part, or an external set)."""

    task: object  # TaskSpec
    tracker: object  # Tracker
    predictor: object  # the kind's predictor
    version: object  # the MLflow ModelVersion
    model_uri: str
    reader: object  # SplitReader over the dataset and split being scored
    part: str  # "test" or "external"
    source: dict  # params naming what was scored (split file and hash, or the external folder)
    experiment_id: str
    run_name: str
    parent_run_id: str | None
    workdir: WorkDir
    n_boot: int

    @property
    def paths(self) -> list[str]:
        return list(self.reader.split.parts[self.part])

    @property
    def groups(self) -> list[str] | None:
        """Each scored image's group as the split file records it (None: the images are the units)."""
        return self.reader.split.units(self.part)

    def bootstrap_facts(self) -> dict:
        """What the bootstrap resampled, for the run's parameters and metrics.json."""
        groups = self.groups
        return {"bootstrap_unit": "image" if groups is None else "group",
                "bootstrap_units": len(self.paths) if groups is None else len(set(groups)),
                "ci_note": too_few_groups(groups)}

    def params(self, images: int, **more) -> dict:
        version = self.version
        return {"model_uri": self.model_uri, "model_name": version.name, "model_version": version.version,
                **self.source, "test_images": images, "bootstrap_resamples": self.n_boot, **more}


class TestScorer(Protocol):
    keys: list[str]

    def score(self, predictor, with_intervals: bool = False) -> tuple[dict, dict]: ...


def interval_metrics(intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`<metric>_ci_low` and `<metric>_ci_high` for MLflow."""
    flat = {f"{k}_ci_low": lo for k, (lo, hi) in intervals.items()}
    flat.update({f"{k}_ci_high": hi for k, (lo, hi) in intervals.items()})
    return flat


@contextmanager
def evaluation_run(context: EvaluationContext) -> Iterator[str]:
    """An evaluation run under the search's run: FINISHED when the block ends, FAILED if it raises."""
    from tune_cells.data.splits import dataset_record

    tracker, reader = context.tracker, context.reader
    run_id = tracker.start_run(context.experiment_id, context.run_name, "evaluation", context.parent_run_id,
                               tags={"model_uri": context.model_uri, "model_version": context.version.version,
                                     "task": context.task.name, "evaluation_data": context.part},
                               source=f"tune-cells evaluate {context.task.name}")
    try:
        # What it scored (the split's test part, or all of an external set) and which model: the UI's lineage.
        tracker.log_dataset(run_id, dataset_record(reader.index, reader.split if context.part == "test" else None),
                            "testing")
        tracker.link_model(run_id, context.version, as_input=True)
        yield run_id
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)
