"""What one trial asks Ray for, and whether that fits the machine or cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tune_cells.errors import UserInputError


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for, by its configuration (picklable: Ray stores it)."""

    cpus: float
    gpus: float | None  # None: the model's default share of a GPU (its registry entry)
    use_gpus: bool

    def __call__(self, config: dict) -> dict[str, float]:
        from tune_cells.models import gpu_share

        gpus = self.gpus if self.gpus is not None else gpu_share(config.get("model", "")) if self.use_gpus else 0.0
        return {"CPU": self.cpus, "GPU": gpus} if gpus else {"CPU": self.cpus}


def check_trial_fits(cpus_per_trial: float | None, gpus_per_trial: float | None, cpus: float, gpus: float) -> None:
    if (gpus_per_trial or 0) > gpus:
        raise UserInputError(f"--gpus-per-trial {gpus_per_trial:g}: this machine has {gpus:g} GPUs")
    if (cpus_per_trial or 0) > cpus:
        raise UserInputError(f"--cpus-per-trial {cpus_per_trial:g}: this machine has {cpus:g} CPUs")


def check_local_resources(cpus_per_trial: float | None, gpus_per_trial: float | None, address: str | None) -> None:
    """A trial that asks for more than this machine has would wait forever on a local Ray: said
    before anything is written (and again against what Ray itself detects, once it runs)."""
    if address:  # a cluster may still grow
        return
    gpus = 0
    if gpus_per_trial:
        import torch

        gpus = torch.cuda.device_count()
    check_trial_fits(cpus_per_trial, gpus_per_trial, os.cpu_count() or 1, gpus)


def trial_resources(cpus_per_trial: float | None, gpus_per_trial: float | None, address: str | None,
                    cluster: dict) -> TrialResources:
    """Explicit flags win; otherwise GPUs are used where the cluster has them, shared per model.

    On a local Ray an impossible request is bad input; on a cluster (--address) the autoscaler
    may still add nodes, so it is only explained while trials wait.
    """
    gpus = cluster.get("GPU", 0)
    if not address:
        check_trial_fits(cpus_per_trial, gpus_per_trial, cluster.get("CPU", 0), gpus)
    return TrialResources(cpus_per_trial or 1.0, gpus_per_trial, use_gpus=gpus > 0)
