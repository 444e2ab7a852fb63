"""A/B lines: what one change buys on validation, same task, split, seed and budget (issue #15).

    .venv/bin/python bench/bench_ab.py bench/ab/nuclei-training.yaml --data ../shared/data/nuclei

An A/B file names a task, a budget in epochs and arms; each arm overrides some parameters of the
base (the task's default space, or `space`, with its first initial point pinned: the recipe):

    task: nuclei
    space: nuclei               # optional: another shipped space's first initial point as the base
    base: {model: resnet18}     # optional: this point of the space as the base instead (all it samples)
    epochs: 5
    arms:
      - {}                          # the base itself, first: every line is read against it
      - {class_balance: sampler}

All arms run in one `tune-cells search` (one trial each, in order, ASHA never stopping them), so
they share the split, the seed (every trial of a search is seeded alike) and the machine. Printed:
each arm's best and last validation metric and its difference from the base.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import bench_parser, quiet_mlflow  # noqa: E402  (a sibling script, not a package)
from bench_recipe import latest_search, recipe_space, search  # noqa: E402


def varied(arms: list[dict]) -> list[str]:
    """The parameters some arm sets."""
    return sorted({key for arm in arms for key in arm})


def ab_space(task: str, arms: list[dict], space: str | None = None, point: dict | None = None) -> dict:
    """The recipe with every varied parameter turned into a choice, and one initial point per arm."""
    base = recipe_space(task, space, point)["params"]
    params = dict(base)
    for key in varied(arms):
        values = []
        for arm in arms:
            value = arm.get(key, base.get(key))
            if value is None:
                sys.exit(f"'{key}' is not in {task}'s recipe: give it in every arm")
            if value not in values:
                values.append(value)
        params[key] = {"choices": values}
    points = [{key: arm.get(key, base.get(key)) for key in varied(arms)} for arm in arms]
    return {"description": f"A/B arms on {task}'s recipe (bench_ab.py)", "params": params, "initial_points": points}


def main() -> None:
    parser = bench_parser(__doc__, "bench-ab-runs", demo_data=True)
    parser.add_argument("ab_file", type=Path)
    parser.add_argument("--epochs", type=int, help="replace the file's budget (a quick look)")
    args = parser.parse_args()
    quiet_mlflow()
    plan = yaml.safe_load(args.ab_file.read_text())
    task, epochs, arms = plan["task"], args.epochs or int(plan["epochs"]), plan["arms"]
    if arms[0]:
        sys.exit(f"{args.ab_file}: the first arm must be the base ({{}})")
    root = args.workdir.resolve() / args.ab_file.stem
    root.mkdir(parents=True, exist_ok=True)
    space_file = root / "ab-space.yaml"
    space_file.write_text(yaml.safe_dump(ab_space(task, arms, plan.get("space"), plan.get("base")), sort_keys=False))

    from tune_cells.tasks import get_task

    args.task = task
    wall = search(args, root / "search", "--space", space_file, "--samples", len(arms), "--max-epochs", epochs,
                  "--grace-period", epochs, "--no-evaluate")
    metric, keys = get_task(task).metric, varied(arms)
    client, _, _, trials = latest_search(root / "search")
    results = {}
    for trial in trials:  # each arm's trial, found by the values it varied (MLflow keeps params as text)
        history = sorted(client.get_metric_history(trial.info.run_id, metric), key=lambda m: m.step)
        results[tuple(trial.data.params.get(k) for k in keys)] = (max(m.value for m in history), history[-1].value,
                                                                 len(history))
    base_params = recipe_space(task, plan.get("space"), plan.get("base"))["params"]
    print(f"\nA/B on {task} ({args.data or 'demo data'}), seed {args.seed}, {epochs} epochs per arm, {metric}; wall {wall:.0f} s, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'arm':<44}{'best':>9}{'last':>9}{'best - base':>14}")
    base_best = None
    for arm in arms:
        key = tuple(str(arm.get(k, base_params.get(k))) for k in keys)
        best, last, n = results.get(key, (float("nan"), float("nan"), 0))
        base_best = best if base_best is None else base_best
        label = ", ".join(f"{k}={v}" for k, v in arm.items()) or "base (the recipe)"
        print(f"{label:<44}{best:>9.4f}{last:>9.4f}{100 * (best - base_best):>+11.2f} pp"
              + ("" if n == epochs else f"  ({n} epochs)"))


if __name__ == "__main__":
    main()
