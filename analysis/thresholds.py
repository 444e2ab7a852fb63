"""Per-target segmentation thresholds chosen on validation at promotion (never on the test part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))


def choose_thresholds(checkpoint: Path, data) -> dict[str, float | str]:
    """For each target, the threshold with the best mean per-image Dice on the validation fields
    (out of fold when the model is a fold ensemble: each field judged by the member that did not
    train on it); ties keep the one nearest 0.5. Written into the checkpoint's spec."""
    from tune_cells.analysis.segmentation_metrics import dice_from_counts, overlap_counts
    from tune_cells.model_io import save_spec
    from tune_cells.segmentation import ImageSegmenter

    segmenter = ImageSegmenter.from_checkpoint(checkpoint)
    if data.folds > 1:
        fields = [(data.train_images[i], data.train_masks[i], int(data.fold_of[i])) for i in range(len(data.train_images))]
        members = list(getattr(segmenter.model, "members", [segmenter.model]))
    else:
        fields = [(image, mask, None) for image, mask in zip(data.val_images, data.val_masks)]
        members = None
    if not fields:
        return {}
    probabilities = []
    for image, _, fold in fields:
        if members is not None and len(members) > 1:
            single = ImageSegmenter(members[fold], segmenter.spec)
            probabilities.append(single.predict_proba(image))
        else:
            probabilities.append(segmenter.predict_proba(image))
    chosen: dict[str, float] = {}
    gains: dict[str, float] = {}
    for k, target in enumerate(segmenter.spec.classes):
        scores = {t: float(np.mean([dice_from_counts(overlap_counts(mask[k], (p[k] > t).astype(np.uint8)))
                                    for (_, mask, _), p in zip(fields, probabilities)]))
                  for t in THRESHOLD_GRID}
        best = max(scores.values())
        chosen[target] = min((t for t, v in scores.items() if v >= best - 1e-9), key=lambda t: abs(t - 0.5))
        # What the choice bought on validation (the A/B against the fixed 0.5), kept with the version.
        gains[f"val_dice_{target}_at_0.5"] = scores[0.5]
        gains[f"val_dice_{target}_at_threshold"] = scores[chosen[target]]
    segmenter.spec.thresholds = chosen
    save_spec(checkpoint, segmenter.spec)
    return {**{f"threshold_{target}": value for target, value in chosen.items()}, **gains}
