"""A champion promoted as an ensemble of retrains (`ensemble: N` in a space): its configuration
trained N-1 more times under other seeds, on the same training part and epochs, and registered as
one model whose members' outputs are averaged (the model format's `members`, as a fold
ensemble's). Why: on lung's 10 fields one training's severe-inflammation Dice swings by up to 0.08
with its seed alone, and the mean of two seeds' maps beat their members' mean in 4 of 6 pairs
(+0.007 on average, half the spread: README, Benchmark); nnU-Net ensembles its five fold models."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tune_cells.model_io import load_spec, save_spec, strip_training_state

log = logging.getLogger(__name__)

# Member seeds: the champion's + 100, + 200, ... (never `evaluate --seeds`' + 1000, + 1001, ...)
MEMBER_SEED_STEP = 100

# (configuration without its seed, seeds, folder to copy them into, tags naming what is retrained for the
# retrains' MLflow runs) -> [(seed, best-epoch checkpoint folder)], each trained and recorded as a trial is
Retrain = Callable[[dict, list[int], Path, dict], list[tuple[int, Path]]]
DONE_SUFFIX = ".done"  # beside a joined ensemble folder, its members' seeds: a resumed promotion reuses it


def member_name(seed: int) -> str:
    return f"seed{seed}"


def member_seeds(base: int, size: int) -> list[int]:
    """The seeds of the retrained members of an ensemble of `size` around a model trained at `base`."""
    return [base + MEMBER_SEED_STEP * i for i in range(1, size)]


def skip_reason(size: int, folds: int, max_latency_ms: float | None) -> str:
    """Why a champion of `ensemble: size` stays one network, or ''."""
    if size <= 1:
        return ""
    if folds > 1:
        return f"ensemble: {size} is not used with --folds {folds}: the champion is already its folds' ensemble"
    if max_latency_ms is not None:
        return f"ensemble: {size} is not used under --max-latency-ms: an ensemble of {size} costs {size} times one network"
    return ""


def extend_with_retrains(checkpoint: Path, size: int, retrain: Retrain, out: Path,
                         retrains_of: dict | None = None) -> list[int]:
    """Make `out` an ensemble of `checkpoint` (one network) and `size`-1 retrains of its
    configuration; `checkpoint` is moved into it. Returns the members' seeds. Where an earlier
    attempt (killed later in the promotion) finished `out`, it is used as it is: no second retrain
    (and no second MLflow run for a member). `retrains_of`: tags for the retrains' runs."""
    done = out.with_name(out.name + DONE_SUFFIX)
    if done.is_file() and out.is_dir():
        log.info("ensemble: %d: the retrains of an earlier attempt of this promotion are reused (%s)", size, out)
        return [int(seed) for seed in done.read_text().split(",")]
    config = load_spec(checkpoint).config
    base = int(config.get("seed") or 0)
    seeds = member_seeds(base, size)
    log.info("ensemble: %d: retraining the champion's configuration under seeds %s", size,
             ", ".join(map(str, seeds)))
    retrained = retrain({key: value for key, value in config.items() if key != "seed"}, seeds,
                        out.with_name(out.name + "-retrains"), retrains_of or {})
    members = [(base, checkpoint), *retrained]
    join([(member_name(seed), folder) for seed, folder in members], out)
    done.write_text(",".join(str(seed) for seed, _ in members))  # written last: the ensemble is whole
    return [seed for seed, _ in members]


def join(members: list[tuple[str, Path]], out: Path) -> None:
    """Move each (member name, checkpoint folder) into `out` as a member; `out`'s spec is the
    first member's, listing them."""
    if out.exists():  # left by an attempt killed here: rebuilt, as its retrains were
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, folder in members:
        shutil.move(str(folder), out / name)
    strip_training_state(out)  # a registered model is its weights and spec
    spec = load_spec(out / members[0][0])
    save_spec(out, replace(spec, members=[name for name, _ in members]))
