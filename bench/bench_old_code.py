"""A/B of a fix whose old code is gone from tune-cells: the fixed code (now) against the old code
(before), reinstated in this process only.

    .venv/bin/python bench/bench_old_code.py frozen-bn --data ../shared/data/nuclei --epochs 10
    .venv/bin/python bench/bench_old_code.py dice-empty-views --data ../shared/data/lung --epochs 20

`tune-cells search` cannot run code that no longer exists, so bench_ab.py does not apply: this
script trains the task's recipe (its default space's first initial point, with the change's
overrides) twice through the same trainable a search runs, on one split (the seed's, without a
search's near-duplicate grouping), seed and decode size (the preflight's for the default space),
once as shipped and once with the old code put back. Printed: each arm's best and last validation
metric, per epoch.

Changes (issue #15):
- frozen-bn (item 4): `freeze_features` keeps the frozen layers' BatchNorm statistics; before, they
  kept updating in train mode.
- dice-empty-views (item 5): the batch soft Dice charges predicted pixels of a target that no view of
  the batch contains; before, segmentation-models-pytorch's multilabel Dice dropped such a target
  from the loss, so those false positives cost nothing (arms use `loss: dice`, where it matters most).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import bench_parser  # noqa: E402  (a sibling script, not a package)
from bench_recipe import recipe_space, run_with_one_line_errors  # noqa: E402

Undo = Callable[[], None]


def _old_batchnorm_loop() -> Undo:
    from tune_cells import training

    shipped = training.freeze_frozen_batchnorm
    training.freeze_frozen_batchnorm = lambda model: None  # BN layers stay in train mode
    return lambda: setattr(training, "freeze_frozen_batchnorm", shipped)


def _old_multilabel_dice() -> Undo:
    from segmentation_models_pytorch.losses import DiceLoss

    from tune_cells.trainables import segmentation

    shipped, smp_dice = segmentation.soft_dice_loss, DiceLoss("multilabel", from_logits=True)
    segmentation.soft_dice_loss = lambda logits, target: smp_dice(logits, target)  # the loss before the fix
    return lambda: setattr(segmentation, "soft_dice_loss", shipped)


@dataclass(frozen=True)
class OldCode:
    task: str
    install: Callable[[], Undo]  # puts the old code back; returns what restores the shipped one
    now: str
    before: str
    overrides: dict = field(default_factory=dict)  # on the recipe, in both arms


CHANGES = {
    "frozen-bn": OldCode("nuclei", _old_batchnorm_loop, "BN statistics frozen (now)",
                         "BN statistics updating (before)", {"freeze_features": True}),
    "dice-empty-views": OldCode("lung", _old_multilabel_dice, "batch Dice, empty views charged (now)",
                                "smp multilabel Dice (before)", {"loss": "dice"}),
}


@dataclass
class Prepared:
    """What both arms share: the task, the recipe's configuration and the trial's inputs (split,
    decoded pixels), made once."""
    task: object
    config: dict
    inputs: object


@dataclass
class RecipeSetup:
    """The recipe of a task on one dataset: its index, the seed's split (without a search's
    near-duplicate grouping), the recipe's configuration and the decode size a search would use."""
    task: object
    index: object
    split: object
    config: dict
    size: int


def recipe_setup(task_name: str, data_root: Path, workdir: Path, seed: int, overrides: dict | None = None,
                 space_name: str | None = None) -> RecipeSetup:
    """The recipe (the first initial point of the task's default space, or of `space_name`) on its split."""
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.preflight import store_size
    from tune_cells.search_spaces import builtin_space_path, load_space
    from tune_cells.space_weights import fit_space_to_weights
    from tune_cells.tasks import get_task

    task = get_task(task_name)
    index = task.importer(data_root)
    split = load_or_create_split(workdir / "splits" / f"{task.name}-{seed}.json", index, seed)
    config = {**recipe_space(task.name, space_name)["params"], **(overrides or {}), "seed": seed}
    space = fit_space_to_weights(load_space(builtin_space_path(space_name or task.default_space)))
    size = store_size(task, index, None, space.largest("image_size")).size  # as a search's preflight decodes
    return RecipeSetup(task, index, split, config, size)


def prepare(change: OldCode, data_root: Path, workdir: Path, epochs: int, seed: int) -> Prepared:
    from tune_cells.data.reader import SplitReader

    setup = recipe_setup(change.task, data_root, workdir, seed, change.overrides)
    task, index, split, config, size = setup.task, setup.index, setup.split, setup.config, setup.size
    reader = SplitReader(index, split, task.channels, size, workdir)
    return Prepared(task, config, task.kind.trial_inputs(task, index, reader, epochs, seed))


def arm_results(prepared: Prepared, install: Callable[[], Undo] | None) -> list[dict]:
    """The recipe's reports per epoch (validation metrics), with the old code put back by `install`."""
    import torch

    from tune_cells.trainables.skeleton import LocalSession

    undo = install() if install else (lambda: None)
    try:
        session = LocalSession(cpus=torch.get_num_threads())
        prepared.inputs.trainable(prepared.config, prepared.inputs.data, session)
    finally:
        undo()
    if session.failure:
        sys.exit(f"arm failed: {session.failure}")
    return session.results


def main() -> None:
    parser = bench_parser(__doc__, "bench-old-code-runs")
    parser.add_argument("change", choices=sorted(CHANGES))
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    change = CHANGES[args.change]
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepared = prepare(change, args.data, args.workdir, args.epochs, args.seed)
    metric = prepared.task.metric
    reports = {change.now: arm_results(prepared, None), change.before: arm_results(prepared, change.install)}
    rows = {label: [r[metric] for r in epochs] for label, epochs in reports.items()}
    print(f"\n{args.change} on {change.task} ({args.data}), the recipe {change.overrides or ''}, seed {args.seed}, "
          f"{args.epochs} epochs per arm, {metric}; wall {time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}")
    width = max(map(len, rows)) + 2
    print(f"{'arm':<{width}}{'best':>8}{'last':>8}   per epoch")
    base = None
    for label, values in rows.items():
        base = max(values) if base is None else base
        print(f"{label:<{width}}{max(values):>8.4f}{values[-1]:>8.4f}   {' '.join(f'{v:.4f}' for v in values)}"
              f"   best - first arm {100 * (max(values) - base):+.2f} pp")
    # per target (segmentation: val_dice_<target>), at the epoch the task's metric was best and at its own best
    parts = sorted({key for epochs in reports.values() for key in epochs[0]
                    if key.startswith(f"{metric}_") and not key.endswith("_se")})  # scores, not their errors
    for key in parts:
        print(key)
        for label, epochs in reports.items():
            best = max(range(len(epochs)), key=lambda e: rows[label][e])
            print(f"  {label:<{width}}at {metric}'s best epoch {epochs[best][key]:.4f}; "
                  f"its own best {max(e[key] for e in epochs):.4f}")


if __name__ == "__main__":
    run_with_one_line_errors(main)
