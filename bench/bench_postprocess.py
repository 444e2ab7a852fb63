"""Post-processing of a segmentation champion's masks, as nnU-Net chooses it on validation: small
predicted regions removed, holes filled, inflammation kept inside the predicted parenchyma, closing and
dilation (for a model that under-segments). No training: it reads the probability maps that
`bench_last_epoch.py` kept for each outer fold (one run, or several averaged as `bench_map_ensemble.py`
averages them), cuts them at the thresholds promotion would choose on the fold's validation fields (the
one-SE rule), and scores each post-processing of the target on the test fields, per image. Printed: the
test mean of every option over all folds' fields, and the option each fold's 2 validation fields would
choose (what a promotion step could ship).

    .venv/bin/python bench/bench_postprocess.py RUN [RUN ...] [--target SevereInflammation]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_thresholds import fold_maps  # noqa: E402

TARGETS = ["Parenchyma", "SevereInflammation"]


def without_regions_below(predicted: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(predicted)
    sizes = ndimage.sum(predicted, labels, range(1, count + 1))
    keep = np.zeros(count + 1, bool)
    keep[1:] = sizes >= pixels
    return keep[labels]


def options() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """Name -> f(target's predicted mask, predicted parenchyma) -> the mask scored."""
    from scipy import ndimage

    chosen: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"none": lambda b, _: b}
    for pixels in (200, 800, 3200, 12800):
        chosen[f"regions >= {pixels} px"] = lambda b, _, n=pixels: without_regions_below(b, n)
    chosen["holes filled"] = lambda b, _: ndimage.binary_fill_holes(b)
    chosen["inside the parenchyma"] = lambda b, parenchyma: b & parenchyma
    for radius in (3, 8):
        chosen[f"closed, {radius} px"] = lambda b, _, r=radius: ndimage.binary_closing(b, iterations=r)
        chosen[f"dilated, {radius} px"] = lambda b, _, r=radius: ndimage.binary_dilation(b, iterations=r)
    return chosen


def main(argv: list[str] | None = None) -> None:
    from tune_cells.analysis.segmentation_metrics import dice
    from tune_cells.analysis.thresholds import _best_thresholds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="bench_last_epoch.py --workdir folders (averaged)")
    parser.add_argument("--target", default="SevereInflammation", choices=TARGETS)
    args = parser.parse_args(argv)
    folds = sorted(p.parent.name for p in args.runs[0].glob("fold-*/probabilities.npz"))
    if not folds:
        parser.error(f"{args.runs[0]}: no fold-*/probabilities.npz (run bench_last_epoch.py there first)")
    for run in args.runs[1:]:
        missing = [fold for fold in folds if not (run / fold / "probabilities.npz").is_file()]
        if missing:
            parser.error(f"{run}: no probabilities.npz for {', '.join(missing)} (the runs must cover the same folds)")
    named = options()
    target = TARGETS.index(args.target)
    validation, test = [], []
    for fold in folds:
        maps = [fold_maps(run / fold / "probabilities.npz") for run in args.runs]
        per_part = []
        for part in ("val", "test"):
            masks = maps[0][f"{part}_mask_"]
            if any(any((a != b).any() for a, b in zip(m[f"{part}_mask_"], masks)) for m in maps[1:]):
                parser.error(f"{fold}: the runs' {part} fields differ (deal them with the same --deal-seed)")
            per_part.append((masks, [np.mean([m[f"swatta_{part}_"][i] for m in maps], 0) for i in range(len(masks))]))
        chosen = _best_thresholds(per_part[0][0], per_part[0][1], TARGETS, one_se=True)[1]
        cut = [float(chosen[t]) for t in TARGETS]
        for (masks, probabilities), scores in zip(per_part, (validation, test)):
            scores.append(np.array([[dice(mask[target] > 0.5, f(p[target] > cut[target], p[0] > cut[0]))
                                     for f in named.values()] for mask, p in zip(masks, probabilities)]))
    on_test = np.concatenate(test)
    print(f"{args.target}: per-image test Dice over {len(on_test)} fields, maps of {', '.join(map(str, args.runs))}")
    for k, name in enumerate(named):
        print(f"  {name:24s} {on_test[:, k].mean():.4f}  (higher on {int((on_test[:, k] > on_test[:, 0]).sum())}, "
              f"lower on {int((on_test[:, k] < on_test[:, 0]).sum())} fields than none)")
    picks = [int(np.argmax(v.mean(0))) for v in validation]
    chosen_scores = np.concatenate([t[:, k] for t, k in zip(test, picks)])
    print(f"  chosen on each fold's validation fields ({', '.join(list(named)[k] for k in picks)}): "
          f"{chosen_scores.mean():.4f}")


if __name__ == "__main__":
    main()
