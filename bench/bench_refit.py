"""What training on the validation part too would buy on the test part (a refit, as scikit-learn and
AutoGluon offer after a search): the recipe trained twice through the same trainable a search runs,
for the same epochs, once on the training part (as a search trains) and once on training +
validation parts, each scored on the test part after every epoch.

    .venv/bin/python bench/bench_refit.py lung --data ../shared/data/lung --epochs 20

A search cannot choose on the test part, and this bench does not choose either: the figure it
compares is the last epoch's (the cosine schedule's end), declared before the run; the per-epoch
curve is printed for reading only. Thresholds stay at the recipe's (0.5), as each epoch's report
scores them. On small datasets where the validation part holds whole animals or patients
(lung: 2 of 7 animals), the question is whether a model that saw more of them recognises unseen
ones better. Run it alone on the machine.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import bench_parser  # noqa: E402  (a sibling script, not a package)
from bench_old_code import Prepared, arm_results, recipe_setup  # noqa: E402
from bench_recipe import run_with_one_line_errors  # noqa: E402


def prepared_arm(task, index, split, train_parts: tuple[str, ...], config: dict, size: int,
                 epochs: int, seed: int, workdir: Path) -> Prepared:
    """The trial's inputs with `train_parts` pooled as its training part and the test part in the
    validation slot (read each epoch for the report; nothing is selected on it)."""
    from tune_cells.data.reader import SplitReader

    parts = {"train": [p for part in train_parts for p in split.parts[part]],
             "val": list(split.parts["test"]), "test": list(split.parts["test"])}
    reader = SplitReader(index, dataclasses.replace(split, parts=parts), task.channels, size, workdir)
    return Prepared(task, config, task.kind.trial_inputs(task, index, reader, epochs, seed))


def main() -> None:
    parser = bench_parser(__doc__, "bench-refit-runs")
    parser.add_argument("task")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    setup = recipe_setup(args.task, args.data, args.workdir, args.seed)
    task, index, split, config, size = setup.task, setup.index, setup.split, setup.config, setup.size
    arms = {"training part (as a search trains)": ("train",), "training + validation parts (refit)": ("train", "val")}
    reports = {}
    for label, parts in arms.items():
        prepared = prepared_arm(task, index, split, parts, config, size, args.epochs, args.seed, args.workdir)
        images = sum(len(split.parts[p]) for p in parts)
        reports[f"{label}, {images} images"] = arm_results(prepared, None)

    metric = task.metric
    print(f"\nrefit on {task.name} ({args.data}), the recipe, seed {args.seed}, {args.epochs} epochs per arm, "
          f"scored on the {len(split.parts['test'])} test images each epoch; wall {time.time() - started:.0f} s, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    keys = [metric] + sorted({k for e in next(iter(reports.values())) for k in e
                              if k.startswith(f"{metric}_") and not k.endswith("_se")})
    width = max(map(len, reports)) + 2
    for key in keys:
        print(f"test {key.removeprefix('val_')} at the last epoch (declared), then per epoch")
        for label, epochs in reports.items():
            print(f"  {label:<{width}}{epochs[-1][key]:.4f}   {' '.join(f'{e[key]:.3f}' for e in epochs)}")


if __name__ == "__main__":
    run_with_one_line_errors(main)
