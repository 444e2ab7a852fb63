"""A champion promoted as an ensemble of the search's own trials (`ensemble: N` with
`ensemble_members: trials`): the promoted trial and the N-1 best other trials that trained every
epoch, registered as one model whose members' outputs are averaged (the model format's `members`).
No network is trained again: the trials are already paid for, where retrains (seed_ensemble.py)
cost N-1 more trainings. A trial that ASHA or the time budget stopped is never a member (stopped
trials are the weaker ones: README, Benchmark), nor one that reads its images differently from the
champion (an ensemble predicts through the first member's input steps). Where too few trials
qualify, promotion retrains instead. nnU-Net ensembles its configurations the same way."""

from __future__ import annotations

import math
from pathlib import Path

# Configuration keys that decide how an image reaches the network: an ensemble's members must agree
# (the size fed to it, ImageNet's or the training part's normalisation, segmentation's scale and tiling).
INPUT_KEYS = ("image_size", "pretrained", "scale", "tile_size", "overlap")


def member_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def complete_trials(result, size: int, max_epochs: int, mode: str) -> list:
    """The best `size`-1 trials other than `result`'s promoted one (TrialSummary) that trained all
    `max_epochs` epochs, kept a checkpoint with a finite score and read their input as the promoted
    one does; best first by their best epoch's metric. Fewer where fewer qualify."""
    champion = result.best_config
    qualified = [t for t in result.trials
                 if t.trial_id != result.best_trial_id and not t.failed and t.iterations >= max_epochs
                 and t.best_checkpoint is not None and math.isfinite(t.best_metric)
                 and all(t.config.get(key) == champion.get(key) for key in INPUT_KEYS)]
    qualified.sort(key=lambda t: t.best_metric, reverse=mode == "max")
    return qualified[: max(0, size - 1)]


def join_trials(checkpoint: Path, champion_id: str, members: list, out: Path) -> list[str]:
    """Make `out` an ensemble of `checkpoint` (the promoted trial's, moved into it) and a copy of
    each member trial's best checkpoint. Returns the members' trial ids, the champion's first.
    Rebuilt from the trials' checkpoints where a killed attempt left it: nothing is trained."""
    import shutil

    from tune_cells.analysis.seed_ensemble import join
    from tune_cells.ray_checkpoints import copy_checkpoint

    copies = out.with_name(out.name + "-trials")
    shutil.rmtree(copies, ignore_errors=True)  # a killed attempt's partial copies
    folders = [(member_name(champion_id), checkpoint)]
    for trial in members:
        folders.append((member_name(trial.trial_id), copy_checkpoint(trial.best_checkpoint, copies / trial.trial_id)))
    join(folders, out)
    return [champion_id, *(trial.trial_id for trial in members)]
