"""Dice and Jaccard for binary masks, with the empty-mask convention stated once.

Convention: when the truth and the prediction are both empty, Dice = Jaccard = 1 (nothing to find,
nothing found); when the truth is empty and the prediction is not, both are 0 and the predicted
pixels are reported (`false_pixels`), since a score alone hides how large the error is.

Per-image Dice (the mean over images) weighs every image equally; pooled Dice sums intersections
and areas over all pixels of all images first, so large structures dominate. On a handful of
test images the two differ a lot, so both are reported.
"""

from __future__ import annotations

import numpy as np


def overlap_counts(truth: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    return {
        "intersection": int(np.count_nonzero(truth & predicted)),
        "truth": int(np.count_nonzero(truth)),
        "predicted": int(np.count_nonzero(predicted)),
    }


def dice_from_counts(counts: dict[str, int]) -> float:
    total = counts["truth"] + counts["predicted"]
    return 1.0 if total == 0 else 2.0 * counts["intersection"] / total


def jaccard_from_counts(counts: dict[str, int]) -> float:
    union = counts["truth"] + counts["predicted"] - counts["intersection"]
    return 1.0 if union == 0 else counts["intersection"] / union


def dice(truth: np.ndarray, predicted: np.ndarray) -> float:
    return dice_from_counts(overlap_counts(truth, predicted))


def segmentation_scores(truths: list[np.ndarray], predictions: list[np.ndarray], targets: list[str],
                        prefix: str) -> tuple[dict[str, float], list[dict]]:
    """Metrics over images: `truths`/`predictions` are T×H×W binary masks per image.

    Returns (summary, rows): summary has `<prefix>dice` (mean over targets of the per-image mean),
    `<prefix>dice_<target>`, `<prefix>jaccard[_<target>]`, `<prefix>pooled_dice[_<target>]`;
    rows are per image and target, with the pixel counts behind each score.
    """
    rows = []
    pooled = {t: {"intersection": 0, "truth": 0, "predicted": 0} for t in targets}
    for image, (truth, predicted) in enumerate(zip(truths, predictions)):
        for k, target in enumerate(targets):
            counts = overlap_counts(truth[k], predicted[k])
            for key, value in counts.items():
                pooled[target][key] += value
            rows.append({"image": image, "target": target, **counts,
                         "dice": dice_from_counts(counts), "jaccard": jaccard_from_counts(counts),
                         "false_pixels": counts["predicted"] if counts["truth"] == 0 else 0})
    summary: dict[str, float] = {}
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        summary[f"{prefix}dice_{target}"] = float(np.mean([r["dice"] for r in mine]))
        summary[f"{prefix}jaccard_{target}"] = float(np.mean([r["jaccard"] for r in mine]))
        summary[f"{prefix}pooled_dice_{target}"] = dice_from_counts(pooled[target])
        summary[f"{prefix}empty_truth_false_pixels_{target}"] = float(sum(r["false_pixels"] for r in mine))
    for name in ("dice", "jaccard", "pooled_dice"):
        summary[f"{prefix}{name}"] = float(np.mean([summary[f"{prefix}{name}_{t}"] for t in targets]))
    return summary, rows


def per_image_dice_se(rows: list[dict], images: int) -> float:
    """Standard error of the mean Dice over images (each image's mean over targets): the one-SE
    rule's yardstick for segmentation (analysis.selection). NaN below two images."""
    if images < 2:
        return float("nan")
    per_image = [np.mean([r["dice"] for r in rows if r["image"] == image]) for image in range(images)]
    return float(np.std(per_image, ddof=1) / np.sqrt(images))
