"""Search benchmark: ASHA's savings, per-trial overhead, input-pipeline share, time to first result.

    .venv/bin/python bench/bench_search.py                 # N=50 configurations x 16 epochs, ~14 min on 2 cores
    .venv/bin/python bench/bench_search.py --samples 12 --max-epochs 4   # a quicker look
    .venv/bin/python bench/bench_search.py --warm-start --samples 12 --max-epochs 4   # --warm-start against cold, 3 seeds

The same N configurations (sampled once, at random, from one seed) are run twice on the generated
nuclei demo data, side by side in one process: once to the full epoch budget (ASHA's grace period
set to the budget, so it never stops a trial) and once with ASHA. Everything printed is a ratio of
the two runs or a share within one, since absolute seconds on a shared CPU mean little.

With --warm-start it compares instead, for each of --seeds seeds, two searches of N trials with
ASHA on the same data, split and space: a cold one (a fresh experiment) and a warm-started one (an
experiment that holds an earlier search of N trials with another seed, whose finished trials the
sampler is given first). Printed side by side: the best validation metric among each search's own N
trials (the earlier search's is on its own split).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import yaml
from bench_args import quiet_mlflow  # a sibling script, not a package: its folder is on sys.path

SPACE = {
    "model": "small_convnet",
    "depth": {"int": [2, 3]},
    "width": {"choices": [12, 16, 24]},
    "dropout": {"float": [0.0, 0.4]},
    "optimizer": {"choices": ["adamw", "sgd"]},
    "lr": {"float": [1.0e-4, 3.0e-2], "log": True},
    "weight_decay": {"float": [1.0e-6, 1.0e-2], "log": True},
    "momentum": 0.9,
    "batch_size": 32,
    "lr_schedule": "cosine",
    "image_size": 48,
    "affine": {"float": [0.0, 0.4]},
    "color_jitter": {"float": [0.0, 0.4]},
}


def sample_configs(n: int, seed: int) -> list[dict]:
    """N configurations drawn at random from SPACE: both runs get exactly these."""
    import optuna

    from tune_cells.search_spaces import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(params=SPACE, source="bench")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        configs.append(dict(trial.params))
        study.tell(trial, 0.0)
    return configs


def run(label: str, root: Path, data: Path, space_file: Path, n: int, epochs: int, grace: int, reduction: int,
        seed: int, warm_start: bool = False) -> dict:
    from tune_cells.paths import WorkDir
    from tune_cells.preflight import SearchOptions
    from tune_cells.search import run_search
    from tune_cells.tracking import Tracker

    workdir = root / label
    started = time.time()
    outcome = run_search(SearchOptions(task="nuclei", data=data, samples=n, max_epochs=epochs, grace_period=grace,
                                       reduction_factor=reduction, seed=seed, space=space_file, workdir=workdir,
                                       experiment=f"bench-{label}", warm_start=warm_start))
    wall = time.time() - started
    tracker = Tracker(outcome.tracking_uri, WorkDir.at(workdir).artifacts)
    experiment_id = tracker.get_run(outcome.parent_run_id).info.experiment_id
    epochs_run, train_s, data_s, firsts, best = 0, 0.0, 0.0, [], []
    for trial in tracker.trial_children(experiment_id, outcome.parent_run_id):
        epoch_times = tracker.metric_history(trial.info.run_id, "epoch_time_s")
        epochs_run += len(epoch_times)
        train_s += sum(m.value for m in epoch_times)
        data_s += sum(m.value for m in tracker.metric_history(trial.info.run_id, "data_time_s"))
        history = tracker.metric_history(trial.info.run_id, outcome.metric)
        if history:
            firsts.append(min(m.timestamp for m in history) / 1000.0)
            best.append(max(m.value for m in history))
    return {"label": label, "wall_s": wall, "epochs": epochs_run, "train_s": train_s, "data_s": data_s,
            "first_result_s": min(firsts) - started if firsts else float("nan"), "best": max(best),
            "trials": outcome.trials, "stopped_early": outcome.stopped_early,
            **time_budget(WorkDir.at(workdir).ray_storage(f"bench-{label}"), started, wall)}


def time_budget(ray_results: Path, started: float, wall: float) -> dict:
    """Where a search's wall time went, from the per-iteration records Ray keeps for each trial
    (`result.json`): each trial's span, each iteration's time in the trial (`time_this_iter_s`)
    against the epoch itself (`epoch_time_s`: training and validation)."""
    spans, first_extra, report_s = [], 0.0, 0.0
    for path in ray_results.glob("**/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "epoch_time_s" in r]
        if not rows:
            continue
        spans.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
        first_extra += rows[0]["time_this_iter_s"] - rows[0]["epoch_time_s"]  # building the model, data refs
        report_s += sum(r["time_this_iter_s"] - r["epoch_time_s"] for r in rows[1:])  # checkpoint + report
    if not spans:
        return {}
    concurrency = os.cpu_count() or 1
    first_start, last_end = min(s for s, _ in spans), max(e for _, e in spans)
    # Slot-seconds left idle inside the search: fewer trials running than there are CPUs.
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    idle, running, last = 0.0, 0, first_start
    for moment, change in events:
        idle += max(0, concurrency - running) * (moment - last)
        running += change
        last = moment
    return {"startup_s": first_start - started, "teardown_s": started + wall - last_end,
            "fit_span_s": last_end - first_start, "idle_slot_s": idle, "trial_start_s": first_extra,
            "report_s": report_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50, help="configurations (N)")
    parser.add_argument("--max-epochs", type=int, default=16, help="full budget per configuration")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA's first rung")
    parser.add_argument("--reduction-factor", type=int, default=4,
                        help="ASHA keeps 1/this at each rung (4: Ray's default and the ASHA paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept for inspection [default: a temp folder]")
    parser.add_argument("--warm-start", action="store_true",
                        help="compare warm-started searches with cold ones (instead of ASHA with the full budget)")
    parser.add_argument("--seeds", type=int, default=3, help="--warm-start: seeds compared (SEED, SEED+1, ...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_mlflow()

    from tune_cells.data.demo import generate

    root = args.workdir or Path(tempfile.mkdtemp(prefix="tune-cells-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = generate(root / "demo-data")
    if args.warm_start:
        compare_warm_start(args, root, data)
        return
    configs = sample_configs(args.samples, args.seed)
    space_file = root / "bench-space.yaml"
    space_file.write_text(yaml.safe_dump({"params": SPACE, "initial_points": configs}, sort_keys=False))

    full = run("full", root, data, space_file, args.samples, args.max_epochs, args.max_epochs,
               args.reduction_factor, args.seed)
    asha = run("asha", root, data, space_file, args.samples, args.max_epochs, args.grace_period,
               args.reduction_factor, args.seed)
    concurrency = os.cpu_count() or 1

    print(f"\ntune-cells search benchmark: {args.samples} configurations x {args.max_epochs} epochs (ASHA: grace "
          f"{args.grace_period}, reduction factor {args.reduction_factor}), nuclei demo data, {concurrency} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'':<56}{'full budget':>14}{'ASHA':>14}")
    rows = [
        ("trials (stopped early)", lambda r: f"{r['trials']} ({r['stopped_early']})"),
        ("epochs trained", lambda r: f"{r['epochs']}"),
        ("best val_balanced_accuracy", lambda r: f"{r['best']:.4f}"),
        ("overhead: wall / (train time / concurrency)", lambda r: f"{r['wall_s'] / (r['train_s'] / concurrency):.2f}"),
        ("input pipeline: data time / epoch time", lambda r: f"{100 * r['data_s'] / r['train_s']:.1f} %"),
        ("time to first result (s)", lambda r: f"{r['first_result_s']:.1f}"),
        ("wall time (s)", lambda r: f"{r['wall_s']:.0f}"),
        ("where the wall time went (s):", lambda r: ""),
        ("  start-up: command to first trial running", lambda r: f"{r['startup_s']:.1f}"),
        ("  trials running (first start to last end)", lambda r: f"{r['fit_span_s']:.1f}"),
        ("    of it, training / concurrency", lambda r: f"{r['train_s'] / concurrency:.1f}"),
        ("    trial set-up in a worker / concurrency", lambda r: f"{r['trial_start_s'] / concurrency:.1f}"),
        ("    checkpoint + report / concurrency", lambda r: f"{r['report_s'] / concurrency:.1f}"),
        ("    CPU slots idle / concurrency", lambda r: f"{r['idle_slot_s'] / concurrency:.1f}"),
        ("  promotion and shutdown", lambda r: f"{r['teardown_s']:.1f}"),
        ("overhead while trials run: span / (train / concurrency)",
         lambda r: f"{r['fit_span_s'] / (r['train_s'] / concurrency):.2f}"),
    ]
    for name, cell in rows:
        print(f"{name:<56}{cell(full):>14}{cell(asha):>14}")
    print(f"\nASHA epochs / full-budget epochs: {asha['epochs'] / full['epochs']:.3f} (target <= 0.25)")
    print(f"ASHA best - full best: {100 * (asha['best'] - full['best']):+.2f} percentage points (target >= -0.5)")
    print(f"ASHA wall time / full-budget wall time: {asha['wall_s'] / full['wall_s']:.3f}")
    print(f"runs kept in {root}")


def compare_warm_start(args, root: Path, data: Path) -> None:
    """Per seed: an earlier search (seed + 1000: its own configurations and split, as a user's earlier
    search would be), then a warm-started search in its experiment and a cold one in a fresh experiment,
    both with the seed (the same split, so their scores compare); each with N trials, ASHA, one space."""
    space_file = root / "warm-space.yaml"
    space_file.write_text(yaml.safe_dump({"params": SPACE}, sort_keys=False))
    flags = (args.samples, args.max_epochs, args.grace_period, args.reduction_factor)
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        earlier = run(f"warm-{seed}", root, data, space_file, *flags, seed + 1000)
        warm = run(f"warm-{seed}", root, data, space_file, *flags, seed, warm_start=True)  # same experiment
        cold = run(f"cold-{seed}", root, data, space_file, *flags, seed)
        rows.append((seed, earlier["best"], cold["best"], warm["best"]))
    print(f"\ntune-cells --warm-start benchmark: best val_balanced_accuracy among a search's own {args.samples} trials "
          f"(x {args.max_epochs} epochs, ASHA grace {args.grace_period}, reduction factor {args.reduction_factor}), "
          f"nuclei demo data, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'seed':<8}{'earlier (+1000)':>16}{'cold':>12}{'warm-started':>14}{'warm - cold':>15}")
    for seed, earlier, cold, warm in rows:
        print(f"{seed:<8}{earlier:>16.4f}{cold:>12.4f}{warm:>14.4f}{100 * (warm - cold):>+12.2f} pp")
    mean = [sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3)]
    print(f"{'mean':<8}{mean[0]:>16.4f}{mean[1]:>12.4f}{mean[2]:>14.4f}{100 * (mean[2] - mean[1]):>+12.2f} pp")
    print(f"warm-started better than cold in {sum(r[3] > r[2] for r in rows)} of {len(rows)} seeds; runs kept in {root}")


if __name__ == "__main__":
    main()
