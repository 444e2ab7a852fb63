"""What every trainable does at its start and at the end of each epoch."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from tune_cells import ray_backend
from tune_cells.model_io import ModelSpec, save_checkpoint
from tune_cells.training import pick_device, seed_everything


@dataclass
class TrialStart:
    node_id: str  # the Ray node, reported with each epoch (and tagged on the trial's run)
    device: torch.device
    seed: int
    generator: torch.Generator


def start_trial(config: dict, default_seed: int) -> TrialStart:
    """Threads and device from what Ray gave the trial; every RNG seeded."""
    where = ray_backend.trial_info()
    torch.set_num_threads(max(1, int(where["cpus"])))
    seed = int(config.get("seed", default_seed))  # `evaluate --seeds` retrains under other seeds
    return TrialStart(where["node_id"], pick_device(where["gpu_ids"]), seed, seed_everything(seed))


def report_epoch(metrics: dict, epoch: int, model: torch.nn.Module, spec: ModelSpec, optimizer, schedule,
                 generator: torch.Generator, **more_state) -> None:
    """Report one epoch's metrics with a checkpoint that can resume training exactly."""
    trainer_state = {
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict() if schedule is not None else None,
        "generator": generator.get_state(),
        "epoch": epoch,
        **more_state,
    }
    with tempfile.TemporaryDirectory(prefix="tune-cells-ckpt-") as tmp:
        save_checkpoint(tmp, model, spec, trainer_state)
        ray_backend.report(metrics, checkpoint_dir=tmp)
