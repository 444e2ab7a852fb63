"""A/B of issue #15 item 4's frozen-BatchNorm fix: `freeze_features` with the frozen layers'
BatchNorm statistics kept (now) against the same layers' statistics updating in train mode (before).

    .venv/bin/python bench/bench_frozen_bn.py --data ../shared/data/nuclei --epochs 4

The old behaviour is gone from tune-cells, so `tune-cells search` cannot run it and bench_ab.py
does not apply: this script trains the task's recipe (its default space's first initial point,
with `freeze_features: true`) twice in this process through the same trainable a search runs, on
the same split and seed, once with `training.freeze_frozen_batchnorm` as shipped and once replaced
by a no-op (the pre-fix loop). Printed: each arm's best and last validation metric per epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipe import recipe_space  # noqa: E402  (a sibling script, not a package)


def arm_results(task_name: str, data_root: Path | None, workdir: Path, epochs: int, seed: int, patch: bool):
    """Validation metrics per epoch of the recipe with frozen features (`patch`: BN statistics updating)."""
    import torch

    from tune_cells import training
    from tune_cells.data.reader import SplitReader
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.tasks import get_task
    from tune_cells.trainables.skeleton import LocalSession

    task = get_task(task_name)
    index = task.importer(data_root)
    split = load_or_create_split(workdir / "splits" / f"{task.name}-{seed}.json", index, seed)
    config = {**recipe_space(task_name)["params"], "freeze_features": True, "seed": seed}
    size = max(int(config["image_size"]), task.min_store_size)
    reader = SplitReader(index, split, task.channels, size, workdir)
    inputs = task.kind.trial_inputs(task, index, reader, epochs, seed)
    shipped = training.freeze_frozen_batchnorm
    if patch:
        training.freeze_frozen_batchnorm = lambda model: None  # before the fix: BN layers stay in train mode
    try:
        session = LocalSession(cpus=torch.get_num_threads())
        inputs.trainable(config, inputs.data, session)
    finally:
        training.freeze_frozen_batchnorm = shipped
    if session.failure:
        sys.exit(f"arm failed: {session.failure}")
    return [r[task.metric] for r in session.results], task.metric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="nuclei")
    parser.add_argument("--data", type=Path, required=True, help="dataset folder in the task's layout")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("bench-frozen-bn-runs"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = {}
    for label, patch in (("BN statistics frozen (now)", False), ("BN statistics updating (before)", True)):
        rows[label], metric = arm_results(args.task, args.data, args.workdir, args.epochs, args.seed, patch)
    print(f"\nfrozen features on {args.task} ({args.data}), the recipe, seed {args.seed}, {args.epochs} epochs per arm, "
          f"{metric}; wall {time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'arm':<34}{'best':>8}{'last':>8}   per epoch")
    base = None
    for label, values in rows.items():
        base = max(values) if base is None else base
        print(f"{label:<34}{max(values):>8.4f}{values[-1]:>8.4f}   {' '.join(f'{v:.4f}' for v in values)}"
              f"   best - first arm {100 * (max(values) - base):+.2f} pp")


if __name__ == "__main__":
    main()
