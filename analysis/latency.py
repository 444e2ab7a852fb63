"""Accuracy against cost: each finished trial's parameter count and inference latency per image,
measured after the search, one model at a time, on the device where predict and serve run the
promoted model (`tune_cells.kinds.PREDICTION_DEVICE`: the CPU, with torch's own thread count, even
where the search trained on CUDA); and which trial a latency budget (`search --max-latency-ms`) promotes.

Latency is the network's forward pass alone (all fold members of an ensemble; preprocessing, decoding
and the softmax are not timed): a batch of `BATCH` random inputs at the model's own image size and
channels (for segmentation, its tile), in float32 under `torch.inference_mode`, `WARMUP` batches
first, then the median of `TIMED` batches, divided by the batch size.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.promotion_rank import trial_rank

log = logging.getLogger(__name__)

BATCH, WARMUP, TIMED = 8, 3, 20
MAX_MEASURED = 20  # only the best trials by validation metric are measured (a budget chooses among them)
TTA_VIEWS = {"none": 1, "dihedral": 8}  # network passes per image of each test-time augmentation
LATENCY, PARAMS, DEVICE_TAG = "latency_ms_per_image", "param_count", "latency_device"


@dataclass(frozen=True)
class Cost:
    param_count: int
    latency_ms: float  # per image
    device: str  # where it was measured, e.g. "cpu (2 threads)"


@dataclass(frozen=True)
class TrialCost:
    trial_id: str
    run_id: str
    metric: float  # its best-epoch validation metric (the checkpoint measured)
    cost: Cost


def prediction_device():
    """Where a registered model runs when it predicts: a budget is only honest measured there."""
    import torch

    from tune_cells.kinds import PREDICTION_DEVICE

    return torch.device(PREDICTION_DEVICE)


def device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def protocol(device) -> str:
    """The measurement, in one line (logged on the search run)."""
    return (f"network forward only, float32, torch.inference_mode, batch {BATCH}, {WARMUP} warm-up then median of "
            f"{TIMED} batches, per image; on {device_label(device)}; at most the best {MAX_MEASURED} finished trials")


def measure(checkpoint: Path, device) -> Cost:
    """Parameter count and latency per image of a checkpoint folder, as its spec predicts (all fold
    members; each test-time view is one more pass)."""
    import statistics
    import time

    import torch

    from tune_cells.model_io import load_spec

    spec = load_spec(checkpoint)
    members = spec.load_members(checkpoint, device)
    views = TTA_VIEWS.get(spec.tta, 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, spec.channels, spec.image_size, spec.image_size, generator=generator).to(device)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for member in members:
            for _ in range(views):
                member(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(WARMUP):
            once()
        seconds = statistics.median(once() for _ in range(TIMED))
    params = sum(p.numel() for member in members for p in member.parameters())
    return Cost(int(params), 1000.0 * seconds / BATCH, device_label(device))


def measure_trials(tracker, result, trial_runs: dict[str, str], mode: str, staging: Path) -> list[TrialCost]:
    """Measure the best checkpoint of each finished trial (the best `MAX_MEASURED` by validation
    metric), one at a time, and log `param_count`, `latency_ms_per_image` and the device to its run.
    A trial already measured on this device (a resumed promotion) keeps its numbers."""
    from tune_cells.ray_checkpoints import copy_checkpoint

    device = prediction_device()
    label = device_label(device)
    done = [t for t in result.trials if t.best_checkpoint is not None and t.trial_id in trial_runs]
    done.sort(key=lambda t: trial_rank(t, mode), reverse=True)  # as promotion ranks them
    if len(done) > MAX_MEASURED:
        log.info("latency: measuring the best %d of %d finished trials", MAX_MEASURED, len(done))
    costs = []
    for trial in done[:MAX_MEASURED]:
        run_id = trial_runs[trial.trial_id]
        run = tracker.get_run(run_id)
        if run.data.tags.get(DEVICE_TAG) == label and LATENCY in run.data.metrics:
            cost = Cost(int(run.data.metrics[PARAMS]), run.data.metrics[LATENCY], label)
        else:
            folder = copy_checkpoint(trial.best_checkpoint, staging / "latency" / trial.trial_id)
            cost = measure(folder, device)
            shutil.rmtree(folder, ignore_errors=True)
            tracker.log_metrics(run_id, {PARAMS: cost.param_count, LATENCY: cost.latency_ms})
            tracker.set_tags(run_id, {DEVICE_TAG: cost.device, "latency_batch_size": BATCH})
        costs.append(TrialCost(trial.trial_id, run_id, trial.best_metric, cost))
    shutil.rmtree(staging / "latency", ignore_errors=True)
    if costs:
        log.info("latency per image on %s: %s", label, ", ".join(
            f"{c.trial_id} {c.cost.latency_ms:.3g} ms ({c.cost.param_count:,} parameters)" for c in costs))
    return costs


def within_budget(result, costs: list[TrialCost], budget: float | None, task: str, already: str | None = None):
    """`result` seen as the trial that promotion takes: the best trial (no budget), or the best
    measured one whose latency fits `budget` ms; `already`: the trial an earlier attempt of this
    promotion registered (kept). Returns (result, a line for the summary, or "")."""
    chosen = already
    if chosen is None and budget is not None:
        fitting = [c for c in costs if c.cost.latency_ms <= budget]
        if not fitting:
            fastest = min(costs, key=lambda c: c.cost.latency_ms, default=None)
            about = (f"the fastest, trial {fastest.trial_id}, takes {fastest.cost.latency_ms:.3g} ms per image on "
                     f"{fastest.cost.device}" if fastest else "no trial's latency was measured")
            raise UserInputError(f"--max-latency-ms {budget:g}: no trial fits ({about}); nothing promoted, the trials "
                                 f"are kept: `tune-cells search {task} --resume --max-latency-ms X` promotes under "
                                 "another budget")
        chosen = fitting[0].trial_id  # costs are in order of the validation metric, best first
    if chosen is None or chosen == result.best_trial_id:
        return result, _note(costs, result.best_trial_id, budget)
    trial = next(t for t in result.trials if t.trial_id == chosen)
    note = _note(costs, chosen, budget) + f"; the best trial overall, {result.best_trial_id}, " + (
        f"takes {_latency(costs, result.best_trial_id)}" if budget is not None else "was not promoted")
    return replace(result, best_trial_id=trial.trial_id, best_config=trial.config, best_metric=trial.best_metric,
                   best_epoch=trial.best_epoch, best_checkpoint=trial.best_checkpoint,
                   best_metrics=trial.best_metrics), note


def _note(costs: list[TrialCost], trial_id: str, budget: float | None) -> str:
    if budget is None:
        return ""
    return f"within --max-latency-ms {budget:g}: {_latency(costs, trial_id)}"


def _latency(costs: list[TrialCost], trial_id: str) -> str:
    cost = cost_of(costs, trial_id)
    return f"{cost.latency_ms:.3g} ms per image on {cost.device}" if cost else "an unmeasured time"


def cost_of(costs: list[TrialCost], trial_id: str) -> Cost | None:
    return next((c.cost for c in costs if c.trial_id == trial_id), None)


def version_cost_tags(cost: Cost | None, tta: str, budget: float | None) -> dict:
    """What a registered version carries: its cost as it predicts (the trial's latency times the
    test-time views finalize chose)."""
    if cost is None:
        return {}
    tags = {PARAMS: cost.param_count, LATENCY: f"{cost.latency_ms * TTA_VIEWS.get(tta, 1):.6g}", DEVICE_TAG: cost.device}
    return {**tags, "latency_budget_ms": f"{budget:g}"} if budget is not None else tags


def allows_tta(cost: Cost | None, budget: float | None) -> bool:
    """Test-time augmentation multiplies the passes per image: only when the budget still holds."""
    return budget is None or (cost is not None and cost.latency_ms * max(TTA_VIEWS.values()) <= budget)


def champion_over_budget(tracker, champion, budget: float, staging: Path) -> float | None:
    """The current champion's latency per image if it exceeds `budget`, else None: its version's
    tag when measured on this device, else measured now from the registry."""
    device = prediction_device()
    tags = champion.tags
    if tags.get(DEVICE_TAG) == device_label(device) and LATENCY in tags:
        latency = float(tags[LATENCY])
    else:
        from tune_cells.tracking import model_checkpoint

        uri = f"models:/{champion.name}/{champion.version}"
        folder = tracker.download_model(uri, staging / "champion")
        latency = measure(model_checkpoint(folder, uri), device).latency_ms
        shutil.rmtree(folder, ignore_errors=True)
    return latency if not latency <= budget else None
