"""A test estimate over every image of a small dataset: K searches whose test parts are disjoint
and together cover the dataset (outer cross-validation), their test predictions pooled.

    .venv/bin/python bench/bench_outer_folds.py leukemia --data ../shared/data/leukemia --folds 6 \\
        -- --samples 12 --max-epochs 20 --grace-period 4

A test part of 27 images cannot show 97.5 % accuracy (27/27 has an exact lower bound of 0.872);
pooled over K outer folds every image is predicted once, by a model whose search never saw it.
The folds are made as a new split is: related images (one group key, near-duplicates by the
preflight's hashes) stay together and classes are stratified (layouts that fix a test part,
like hep2's, are refused). Fold k is the test part of search k, fold k+1 its validation part, the rest its
training part; each search is `tune-cells search` as a user runs it (the given flags), on that
split file (editable JSON, read when present), in its own working folder. Printed: each fold's
accuracy, then the pooled accuracy with its exact (Clopper-Pearson) interval, balanced accuracy
and ROC AUC. Each fold's own search, promotion and evaluation stay in its MLflow store.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import bench_parser, quiet_mlflow  # noqa: E402  (a sibling script, not a package)
from bench_recipe import champion_test_predictions, run_with_one_line_errors, search  # noqa: E402


def outer_folds(units: list[tuple[list[str], int]], folds: int, seed: int) -> list[list[str]]:
    """`units` (the images of one group, their class) dealt into `folds` disjoint folds of images,
    class by class in a seeded shuffled order, the deal continuing across classes so that fold
    sizes differ by at most one unit per class."""
    rng = np.random.default_rng(seed)
    dealt: list[list[str]] = [[] for _ in range(folds)]
    turn = 0
    for label in sorted({label for _, label in units}):
        members = [images for images, unit_label in units if unit_label == label]
        for k in rng.permutation(len(members)):
            dealt[turn % folds].extend(members[k])
            turn += 1
    return [sorted(fold) for fold in dealt]


def fold_parts(folds: list[list[str]], k: int) -> dict[str, list[str]]:
    """Search k's parts: fold k tests, fold k+1 validates, the others train."""
    held = {k, (k + 1) % len(folds)}
    return {"train": sorted(p for j, fold in enumerate(folds) if j not in held for p in fold),
            "val": folds[(k + 1) % len(folds)], "test": folds[k]}


def base_split(task, index, seed: int):
    """The split a new search would plan (its groups and left-out twins), from the preflight's hashes."""
    import tempfile

    from tune_cells.data.splits import plan_split
    from tune_cells.preflight import store_size

    scan = task.kind.decode_for_search(task, index, store_size(task, index).size)
    with tempfile.TemporaryDirectory() as nowhere:  # planned, never written: each fold writes its own
        return plan_split(Path(nowhere) / "split.json", index, seed, scan.hashes)


def main() -> None:
    parser = bench_parser(__doc__, "bench-outer-folds-runs")
    parser.add_argument("task")
    parser.add_argument("--folds", type=int, default=6)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:cut]), argv[cut + 1:]  # after --: flags for every search
    if args.folds < 3:
        parser.error(f"--folds {args.folds}: at least 3 (each search needs a test, a validation and a training fold)")
    quiet_mlflow()

    from scipy.stats import binomtest
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from tune_cells.data.splits import split_path
    from tune_cells.tasks import get_task

    task = get_task(args.task)
    index = task.importer(args.data.resolve())
    if "split" in index.items.columns and index.items["split"].notna().any():
        sys.exit(f"--data {index.root}: its layout fixes the test part; outer folds are for datasets without one")
    base = base_split(task, index, args.seed)
    left_out = {entry["path"] for entry in base.excluded}
    in_group = {path: name for name, members in (base.groups or {}).items() for path in members}
    labels = dict(zip(index.items["path"], index.items["label"]))
    units, seen = [], set()
    for path in index.items["path"]:
        if path in left_out or path in seen:
            continue
        members = [p for p in base.groups[in_group[path]] if p not in left_out] if path in in_group else [path]
        seen.update(members)
        units.append((members, int(labels[members[0]])))
    folds = outer_folds(units, args.folds, args.seed)
    root = args.workdir.resolve() / args.task
    tables, started = [], time.time()
    for k in range(args.folds):
        workdir = root / f"fold-{k}"
        path = split_path(workdir, task.name, index, args.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**base.header, **fold_parts(folds, k), "groups": base.groups,
                                    "excluded": base.excluded}, indent=1))
        search(args, workdir, *flags)  # as a user runs it; exits with the log's path if it fails
        table = champion_test_predictions(workdir)
        if table is None:
            sys.exit(f"{workdir}: no per-image test predictions to pool (outer folds are for classification tasks)")
        tables.append(table)
        print(f"fold {k}: {len(table)} test images, accuracy {np.mean(table['label'] == table['predicted']):.4f}",
              flush=True)

    import pandas as pd

    pooled = pd.concat(tables, ignore_index=True)
    correct = int((pooled["label"] == pooled["predicted"]).sum())
    interval = binomtest(correct, len(pooled)).proportion_ci(method="exact")
    probabilities = pooled[[f"prob_{c}" for c in index.classes]].to_numpy()
    truth = np.array([index.classes.index(c) for c in pooled["label"]])
    auc = (roc_auc_score(truth, probabilities[:, 1]) if len(index.classes) == 2
           else roc_auc_score(truth, probabilities, multi_class="ovr"))
    print(f"\n{task.name} ({index.root}), {args.folds} outer folds, seed {args.seed}, each search: "
          f"{' '.join(flags) or 'the defaults'}; wall {time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"pooled over {len(pooled)} images (each tested once): accuracy {correct / len(pooled):.4f} "
          f"(exact 95% CI [{interval.low:.4f}, {interval.high:.4f}]), balanced accuracy "
          f"{balanced_accuracy_score(pooled['label'], pooled['predicted']):.4f}, ROC AUC {auc:.4f}")
    wrong = pooled.loc[pooled["label"] != pooled["predicted"], "path"].tolist()
    if wrong:
        print(f"misclassified ({len(wrong)}):", ", ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))


if __name__ == "__main__":
    run_with_one_line_errors(main)
