"""Models averaged without training: the probability maps that `bench_last_epoch.py` kept for each
test field, from two or more of its runs, averaged field by field (fields matched by their masks, so
runs with other fold deals pair too), against each run alone. Each run's maps are read as a
champion is registered (the validation-best average, test-time augmentation, one-SE thresholds);
the average is cut at the mean of its members' thresholds, and at 0.5.

    .venv/bin/python bench/bench_map_ensemble.py RUN_A RUN_B [RUN_C ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_thresholds import dice_at, fold_maps  # noqa: E402


def test_fields(run: Path, targets: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, list[float]]]:
    """Per test field (by its mask's hash): mask, the registered model's map, its one-SE thresholds."""
    from tune_cells.analysis.thresholds import _best_thresholds

    fields = {}
    for path in sorted(run.glob("fold-*/probabilities.npz")):
        maps = fold_maps(path)
        chosen = _best_thresholds(maps["val_mask_"], maps["swatta_val_"], targets, one_se=True)[1]
        for mask, probabilities in zip(maps["test_mask_"], maps["swatta_test_"]):
            fields[hashlib.sha256(mask.tobytes()).hexdigest()] = (mask, probabilities, [float(chosen[t]) for t in targets])
    return fields


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="bench_last_epoch.py --workdir folders (two or more)")
    parser.add_argument("--targets", nargs="+", default=["Parenchyma", "SevereInflammation"])
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give two or more runs to average")
    runs = [test_fields(run, args.targets) for run in args.runs]
    for run, fields in zip(args.runs, runs):
        if not fields:
            parser.error(f"{run}: no fold-*/probabilities.npz (run bench_last_epoch.py there first)")
        if sorted(fields) != sorted(runs[0]):
            parser.error(f"{run}: tests other fields than {args.runs[0]}")
    alone, averaged, at_half = [], [], []
    for key in sorted(runs[0]):
        mask = runs[0][key][0]
        alone.append([dice_at([mask], [fields[key][1]], fields[key][2])[0] for fields in runs])
        mean = np.mean([fields[key][1] for fields in runs], axis=0)
        averaged.append(dice_at([mask], [mean], list(np.mean([fields[key][2] for fields in runs], axis=0)))[0])
        at_half.append(dice_at([mask], [mean], [0.5] * len(args.targets))[0])
    alone, averaged, at_half = np.array(alone), np.array(averaged), np.array(at_half)
    print(f"per-image test Dice over {len(averaged)} fields: {', '.join(args.targets)}")
    for k, run in enumerate(args.runs):
        print(f"  {str(run):50s} {'  '.join(f'{v:.4f}' for v in alone[:, k].mean(0))}")
    print(f"  {'mean of the runs alone':50s} {'  '.join(f'{v:.4f}' for v in alone.mean((0, 1)))}")
    print(f"  {'maps averaged, mean of their thresholds':50s} {'  '.join(f'{v:.4f}' for v in averaged.mean(0))}")
    print(f"  {'maps averaged, 0.5':50s} {'  '.join(f'{v:.4f}' for v in at_half.mean(0))}")


if __name__ == "__main__":
    main()
