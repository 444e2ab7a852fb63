"""Threshold rules for the promoted lung average, read from what `bench_last_epoch.py` kept: per outer
fold, the validation-best average's probability maps on its validation and test fields, with and
without test-time augmentation (`fold-K/probabilities.npz`). No training: each rule is applied to the
same maps.

    .venv/bin/python bench/bench_thresholds.py bench-last-epoch-runs

Rules: 0.5 for every target without augmentation (the bench's own rule); each target's threshold
chosen on the fold's validation fields, as promotion chooses it (`analysis.thresholds`), without
augmentation; promotion's whole choice, thresholds and augmentation where validation gains (what a
lung champion was registered with until session 15); and 0.5, the chosen thresholds or the one-SE
thresholds (0.5 unless another beats it on validation by more than one standard error, registered
since session 16) with the augmentation always (`threshold_choice`, `tta_choice`). Printed:
per-image test Dice per target over every fold's test fields, and each rule's paired difference
from 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def fold_maps(path: Path) -> dict[str, list[np.ndarray]]:
    """The kept maps of one fold, by kind (`swa_best_val_`, `swatta_test_`, `val_mask_`, ...), in field order."""
    kept = np.load(path)
    kinds: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key in kept.files:
        kind, index = key.rsplit("_", 1)
        kinds.setdefault(kind + "_", []).append((int(index), kept[key].astype(np.float32)))
    return {kind: [m for _, m in sorted(maps, key=lambda pair: pair[0])] for kind, maps in kinds.items()}


def dice_at(masks: list[np.ndarray], probabilities: list[np.ndarray], thresholds: list[float]) -> np.ndarray:
    """Per test field (rows) and target (columns), Dice at each target's threshold."""
    from tune_cells.analysis.segmentation_metrics import dice_from_counts, overlap_counts

    return np.array([[dice_from_counts(overlap_counts(mask[k], (p[k] > t).astype(np.uint8)))
                      for k, t in enumerate(thresholds)] for mask, p in zip(masks, probabilities)])


def main() -> None:
    from tune_cells.analysis.thresholds import _best_thresholds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a bench_last_epoch.py --workdir whose folds kept their maps")
    parser.add_argument("--targets", nargs="+", default=["Parenchyma", "SevereInflammation"])
    args = parser.parse_args()
    paths = sorted(args.workdir.glob("fold-*/probabilities.npz"))
    if not paths:
        sys.exit(f"{args.workdir}: no fold-*/probabilities.npz (run bench_last_epoch.py there first)")
    rules = ("0.5, no augmentation", "thresholds chosen on validation, no augmentation",
             "thresholds and augmentation chosen on validation (registered until session 15)", "0.5, augmentation always",
             "thresholds chosen on validation, augmentation always (registered in session 15)",
             "one-SE thresholds, augmentation always (registered since session 16)")
    per_rule: dict[str, list[np.ndarray]] = {rule: [] for rule in rules}

    def listed(thresholds: dict[str, float]) -> list[float]:
        return [float(thresholds[t]) for t in args.targets]

    for path in paths:
        maps = fold_maps(path)
        val_masks, test_masks = maps["val_mask_"], maps["test_mask_"]
        chosen = {tta: _best_thresholds(val_masks, maps[f"{arm}val_"], args.targets)
                  for tta, arm in (("none", "swa_best_"), ("dihedral", "swatta_"))}
        one_se = _best_thresholds(val_masks, maps["swatta_val_"], args.targets, one_se=True)[1]
        tta = max(chosen, key=lambda name: chosen[name][0])  # none on a tie, as promotion
        plain_maps, augmented_maps, at_half = maps["swa_best_test_"], maps["swatta_test_"], [0.5] * len(args.targets)
        applied = dict(zip(rules, ((plain_maps, at_half), (plain_maps, listed(chosen["none"][1])),
                                   (augmented_maps if tta == "dihedral" else plain_maps, listed(chosen[tta][1])),
                                   (augmented_maps, at_half), (augmented_maps, listed(chosen["dihedral"][1])),
                                   (augmented_maps, listed(one_se)))))
        for rule, (test_maps, thresholds) in applied.items():
            per_rule[rule].append(dice_at(test_masks, test_maps, thresholds))
        print(f"{path.parent.name}: thresholds without augmentation {listed(chosen['none'][1])} (validation "
              f"{chosen['none'][0]:.3f}); with {listed(chosen['dihedral'][1])} ({chosen['dihedral'][0]:.3f}); one-SE "
              f"{listed(one_se)}; promoted: "
              f"{tta}; test " + "; ".join(f"{rule}: " + " ".join(f"{v:.3f}" for v in per_rule[rule][-1][:, -1])
                                       for rule in rules))
    base = np.concatenate(per_rule[rules[0]])
    print(f"\n{len(paths)} folds, {len(base)} test fields; per-image test Dice ({', '.join(args.targets)}):")
    for rule in rules:
        scores = np.concatenate(per_rule[rule])
        diff = scores - base
        print(f"  {rule}: " + ", ".join(f"{t} {scores[:, k].mean():.4f}" for k, t in enumerate(args.targets))
              + ("" if rule == rules[0] else "; against 0.5: " + ", ".join(
                  f"{t} {diff[:, k].mean():+.4f} (higher on {int((diff[:, k] > 0).sum())}, lower on "
                  f"{int((diff[:, k] < 0).sum())})" for k, t in enumerate(args.targets))))


if __name__ == "__main__":
    main()
