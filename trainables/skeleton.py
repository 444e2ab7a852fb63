"""How one trial trains, for every kind: seeding, device and threads, resume, NaN/inf, out of memory
and per-epoch reporting. A kind's trainer overrides a few small hooks (nnU-Net's trainer variants).

Imports neither Ray nor MLflow: a trial reaches Ray through a `TrialSession` (Ray's, from
`tune_cells.ray_trial`, when Tune runs the trial; `LocalSession` when a test or a device check
trains outside Tune).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from tune_cells.config import TrainerConfig
from tune_cells.failpoints import armed
from tune_cells.model_io import ModelSpec, restore_training, save_checkpoint, save_spec
from tune_cells.paths import checkpoint_staging_dir
from tune_cells.promotion_rank import PROMOTION_SCORE, checkpoint_rank, promotion_score
from tune_cells.training import (
    NonFiniteLossError,
    build_lr_schedule,
    build_optimizer,
    is_out_of_memory,
    pick_device,
    seed_everything,
    step_lr_schedule,
)


class TrialSession(Protocol):
    """Where a trial runs and where its results go (`tune_cells.ray_trial` is one)."""

    def trial_info(self) -> dict: ...  # node_id, cpus, gpu_ids
    def resumed_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None: ...
    def report_failure(self, message: str, metric_keys) -> None: ...


@dataclass
class LocalSession:
    """A trial outside Ray Tune: results in a list, the last checkpoint copied to `checkpoint_dir`."""

    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    cpus: int = 1
    results: list[dict] = field(default_factory=list)
    failure: str | None = None

    def trial_info(self) -> dict:
        return {"trial_id": "local", "node_id": "local", "cpus": self.cpus, "gpu_ids": []}

    @contextlib.contextmanager
    def resumed_checkpoint(self) -> Iterator[Path | None]:
        yield self.resume_from

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.results.append({**metrics, "training_iteration": len(self.results) + 1})
        if checkpoint_dir is not None and self.checkpoint_dir is not None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)  # like Ray: the latest checkpoint, whole
            shutil.copytree(checkpoint_dir, self.checkpoint_dir)

    def report_failure(self, message: str, metric_keys) -> None:
        self.failure = message


def ray_session() -> TrialSession:
    """The session of a trial that Ray Tune runs (imported only then)."""
    from tune_cells import ray_trial

    return ray_trial


class FoldedData:
    """Trial data that may carry K folds (`fold_of`: each pooled image's fold; its `fold(k)` cuts one).
    Its `metric` and `mode` (the search's) decide when a trial's weights are checkpointed."""

    fold_of = None

    @property
    def folds(self) -> int:
        return 1 if self.fold_of is None else int(self.fold_of.max()) + 1


@dataclass
class CheckpointPolicy:
    """What a trial writes each epoch: everything `--resume` needs (weights, trainer and optimiser
    state) every `every` epochs and at the last; the weights (and the small trainer state) alone
    whenever the promotion score improves, so the best epoch, which promotion registers, always has its
    weights; nothing otherwise. A resume from a weights-only checkpoint restarts the optimiser's
    moments (`tune_cells.model_io.restore_training`). `best` is the best PROMOTION_SCORE so far."""

    metric: str
    mode: str
    every: int
    last_epoch: int
    best: float | None = None

    def decide(self, epoch: int, metrics: dict) -> str | None:
        """"full", "weights" or None (no checkpoint this epoch). `metrics` carry PROMOTION_SCORE, or
        the metric alone (then every epoch is offered)."""
        value = checkpoint_rank(metrics, self.metric, self.mode) if isinstance(metrics.get(self.metric), (int, float)) \
            else None
        improved = isinstance(value, (int, float)) and math.isfinite(value) and (self.best is None or value > self.best)
        if improved:
            self.best = float(value)
        if epoch % self.every == 0 or epoch == self.last_epoch:
            return "full"
        return "weights" if improved else None


def checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def report_epoch(session: TrialSession, policy: CheckpointPolicy, epoch: int, metrics: dict, save,
                 offered: bool = True) -> None:
    """Report one epoch, with its PROMOTION_SCORE (`offered`: whether these weights are offered for
    promotion) and the checkpoint the policy asks for (`save(directory, full)` writes it);
    `checkpoint_mb` says how much was written."""
    if isinstance(metrics.get(policy.metric), (int, float)):
        metrics = {**metrics, PROMOTION_SCORE: promotion_score(metrics[policy.metric], policy.mode, offered)}
    what = policy.decide(epoch, metrics)
    if what is None:
        session.report({**metrics, "checkpoint_mb": 0.0})
        return
    with tempfile.TemporaryDirectory(prefix="tune-cells-ckpt-", dir=checkpoint_staging_dir()) as tmp:
        save(Path(tmp), what == "full")
        session.report({**metrics, "checkpoint_mb": checkpoint_bytes(Path(tmp)) / 1e6}, checkpoint_dir=Path(tmp))


class TrialTrainer(ABC):
    """The skeleton; a kind's trainer fills in `setup`, `train_epoch` and `validate`."""

    config_type: ClassVar[type[TrainerConfig]]
    oom_hint: ClassVar[str] = "try a smaller batch_size"
    epoch = 0  # the epoch being trained and validated (1-based; set by run_epoch)

    def __init__(self, config: dict, data, session: TrialSession):
        self.session = session
        self.data = data
        self.config = self.config_type.from_flat(config, strict=False)
        place = session.trial_info()
        torch.set_num_threads(max(1, int(place["cpus"])))
        self.node_id = place["node_id"]
        self.device = pick_device(place["gpu_ids"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks its fastest kernels once
        self.seed = self.config.seed if self.config.seed is not None else data.seed  # `--seeds` sets other seeds
        self.generator = seed_everything(self.seed)
        self.policy = CheckpointPolicy(data.metric, data.mode, self.config.checkpoint_every, data.max_epochs)

    # --- hooks of a kind ---------------------------------------------------------------

    @abstractmethod
    def setup(self) -> tuple[ModelSpec, torch.nn.Module]:
        """The spec and the network on `self.device`, plus whatever the epochs need."""

    @abstractmethod
    def train_epoch(self) -> dict[str, float]:
        """One epoch of training: at least `train_loss`. Raises NonFiniteLossError on NaN/inf."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Validation metrics: at least `val_loss` (which a plateau schedule steps on)."""

    @property
    @abstractmethod
    def metric_keys(self) -> tuple[str, ...]:
        """What each epoch reports (a failed trial reports NaN for the first few)."""

    def extra_state(self) -> dict[str, Any]:
        """More trainer state for an exact resume (e.g. a NumPy RNG)."""
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:  # noqa: B027 (an optional hook)
        """Restore what `extra_state` saved."""

    def promoted_weights(self) -> torch.nn.Module:
        """The network whose weights this epoch validated and its checkpoint keeps (what promotion
        registers): the trained one, unless a kind validates another (an average of its weights)."""
        return self.model

    def prepare_epoch(self) -> None:  # noqa: B027 (an optional hook)
        """Before each epoch trains (after any resume), with `self.epoch` set: e.g. a held learning rate."""

    def offered_for_promotion(self) -> bool:
        """Whether this epoch's weights compete for promotion with the trial's others (PROMOTION_SCORE);
        a trial that averages its weights offers only its averages."""
        return True

    # --- the skeleton ------------------------------------------------------------------

    def run(self) -> None:
        with self.session.resumed_checkpoint() as checkpoint:
            first_epoch = self.start(checkpoint)
        for epoch in range(first_epoch, self.data.max_epochs + 1):
            metrics = self.run_epoch(epoch)
            if metrics is None:
                return
            report_epoch(self.session, self.policy, epoch, metrics,
                         lambda directory, full, epoch=epoch: self.save(directory, epoch, full),
                         offered=self.offered_for_promotion())

    def start(self, checkpoint: Path | None) -> int:
        """Build the network and its optimiser; restore them from `checkpoint` (a resumed or retried
        trial continues where it stopped). Returns the first epoch to train."""
        self.spec, self.model = self.setup()
        self.spec.config = {**self.config.to_flat(), "seed": self.seed}
        self.optimizer = build_optimizer(self.config, self.model)
        for group in self.optimizer.param_groups:  # each group's configured rate (a plateau schedule never sets it)
            group.setdefault("initial_lr", group["lr"])
        self.schedule = build_lr_schedule(self.config, self.optimizer, self.data.max_epochs)
        if checkpoint is None:
            return 1
        state = restore_training(checkpoint, self.model, self.optimizer, self.schedule, self.generator, self.device)
        self.restore_extra(state)
        self.policy.best = state.get("best_promotion_score")  # older checkpoints kept the metric: start afresh
        return int(state["epoch"]) + 1

    def run_epoch(self, epoch: int) -> dict | None:
        """Train and validate one epoch: its metrics, or None when the trial diverged (then it is
        reported as failed, never retried: the divergence would repeat)."""
        started = time.perf_counter()
        self.epoch = epoch
        self.prepare_epoch()
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            if armed(f"diverge:seed{self.seed}"):  # the fault tests' unlucky seed
                raise NonFiniteLossError(f"training loss became nan (failpoint diverge:seed{self.seed})")
            trained = self.train_epoch()
        except NonFiniteLossError as exc:
            self.session.report_failure(f"diverged at epoch {epoch}: {exc}", self.metric_keys[:4])
            return None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # a failed trial with a hint, not a dead search
            raise MemoryError(f"out of memory at batch_size {self.config.batch_size} on {self.device}: "
                              f"{self.oom_hint}") from exc
        validated = self.validate()
        step_lr_schedule(self.schedule, validated["val_loss"])
        return {**trained, **validated, "lr": lr, "epoch_time_s": time.perf_counter() - started,
                "node_id": self.node_id}

    def save(self, directory: Path, epoch: int, full: bool = True) -> None:
        """A checkpoint: weights, spec and the small trainer state; with `full`, the optimiser's state
        too, so that training resumes exactly."""
        trainer_state = {
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "generator": self.generator.get_state(),
            "epoch": epoch,
            "best_promotion_score": self.policy.best,
            **self.extra_state(),
        }
        save_checkpoint(directory, self.promoted_weights(), self.spec, trainer_state,
                        self.optimizer.state_dict() if full else None)


class FoldEnsembleTrainer:
    """K-fold cross-validation inside one trial: K trainers of one kind side by side, one per fold
    of the pooled train and validation parts; each epoch reports the mean of their metrics (what
    ASHA and Optuna see) and checkpoints all K, as one fold-ensemble model."""

    def __init__(self, trainer_type: type[TrialTrainer], config: dict, data, session: TrialSession):
        self.session = session
        self.max_epochs = data.max_epochs
        self.members = [trainer_type(config, data.fold(k), session) for k in range(data.folds)]
        self.policy = self.members[0].policy  # one policy, on the mean over folds, saved with every member
        for member in self.members:
            member.policy = self.policy

    def run(self) -> None:
        with self.session.resumed_checkpoint() as checkpoint:
            first_epoch = min(member.start(checkpoint / member_name(k) if checkpoint is not None else None)
                              for k, member in enumerate(self.members))
        for epoch in range(first_epoch, self.max_epochs + 1):
            per_fold = []
            for member in self.members:
                metrics = member.run_epoch(epoch)
                if metrics is None:
                    return
                per_fold.append(metrics)
            report_epoch(self.session, self.policy, epoch, self.mean(per_fold),
                         lambda directory, full, epoch=epoch: self.save(directory, epoch, full),
                         offered=all(member.offered_for_promotion() for member in self.members))

    @staticmethod
    def mean(per_fold: list[dict]) -> dict:
        numbers = [k for k, v in per_fold[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        mean = {**per_fold[0], **{k: sum(m[k] for m in per_fold) / len(per_fold) for k in numbers}}
        for key in (k for k in numbers if k.endswith("_se")):  # a standard error: of the mean of K fold means
            mean[key] = math.sqrt(sum(m[key] ** 2 for m in per_fold)) / len(per_fold)
        mean["epoch_time_s"] = sum(m["epoch_time_s"] for m in per_fold)  # folds train one after another
        return mean

    def save(self, directory: Path, epoch: int, full: bool = True) -> None:
        for k, member in enumerate(self.members):
            member.save(directory / member_name(k), epoch, full)
        ensemble = replace(self.members[0].spec, members=[member_name(k) for k in range(len(self.members))])
        save_spec(directory, ensemble)


def member_name(fold: int) -> str:
    return f"fold{fold}"


def run_trial(trainer_type: type[TrialTrainer], config: dict, data, session: TrialSession) -> None:
    """One trial: a single model, or a fold ensemble when the data carries folds."""
    if data.folds > 1:
        FoldEnsembleTrainer(trainer_type, config, data, session).run()
    else:
        trainer_type(config, data, session).run()
