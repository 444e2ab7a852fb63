"""Per-target segmentation thresholds chosen on validation at promotion (never on the test part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))


def choose_thresholds(checkpoint: Path, data, allow_tta: bool = True) -> dict[str, float | str]:
    """For each target, the threshold with the best mean per-image Dice on the validation fields
    (out of fold when the model is a fold ensemble: each field judged by the member that did not
    train on it); ties keep the one nearest 0.5. Then test-time augmentation (the mean over the 8
    flips and turns, `tune_cells.segmentation.dihedral_logits`) where it raises the targets' mean of
    that best Dice; a tie keeps none, 8 times cheaper. `allow_tta` False (a latency budget): none.
    The trial's `threshold_choice: fixed` keeps its `threshold` for every target, and `tta_choice`
    `always` or `never` skips that choice (validation is then scored, not chosen on). Both written
    into the checkpoint's spec."""
    from tune_cells.model_io import save_spec
    from tune_cells.segmentation import ImageSegmenter

    segmenter = ImageSegmenter.from_checkpoint(checkpoint)
    config = segmenter.config  # the trial's: its threshold_choice and tta_choice
    grid = THRESHOLD_GRID if config.threshold_choice == "validation" else (config.threshold,)
    offered = {"validation": ("none", "dihedral"), "always": ("dihedral",), "never": ("none",)}[config.tta_choice]
    if data.folds > 1:
        fields = [(data.train_images[i], data.train_masks[i], int(data.fold_of[i])) for i in range(len(data.train_images))]
        members = list(getattr(segmenter.model, "members", [segmenter.model]))
        if len(members) != data.folds:  # out of fold needs one member per fold, in fold order, as trials save them
            raise ValueError(f"{checkpoint}: {len(members)} networks for {data.folds} folds; thresholds are chosen "
                             "out of fold on a fold ensemble of the search's folds")
    else:
        fields = [(image, mask, None) for image, mask in zip(data.val_images, data.val_masks)]
        members = None
    if not fields:
        return {}
    choices = {}
    for tta in offered if allow_tta else ("none",):
        segmenter.spec.tta = tta
        probabilities = []
        for image, _, fold in fields:
            if members is not None and len(members) > 1:
                probabilities.append(ImageSegmenter(members[fold], segmenter.spec).predict_proba(image))
            else:
                probabilities.append(segmenter.predict_proba(image))
        choices[tta] = _best_thresholds([mask for _, mask, _ in fields], probabilities, segmenter.spec.classes, grid)
    tta = max(choices, key=lambda name: choices[name][0])  # the first best: none on a tie
    score, chosen, gains = choices[tta]
    segmenter.spec.thresholds, segmenter.spec.tta = chosen, tta
    save_spec(checkpoint, segmenter.spec)
    # What each choice bought on validation (the A/Bs against 0.5 and against no augmentation), kept with the version.
    # validation_score: the task's metric (the targets' mean per-image Dice) as the model will predict
    return {"validation_score": score, **{f"threshold_{target}": value for target, value in chosen.items()}, **gains,
            "tta": tta, **{f"val_dice_tta_{name}": value[0] for name, value in choices.items()}}


def _best_thresholds(masks: list[np.ndarray], probabilities: list[np.ndarray], targets: list[str],
                     grid: tuple[float, ...] = THRESHOLD_GRID) -> tuple[float, dict[str, float], dict[str, float]]:
    """Each target's threshold in `grid` with the best mean per-image Dice (ties: nearest 0.5); the
    targets' mean of those Dice; and each target's Dice at 0.5 and at its threshold."""
    from tune_cells.analysis.segmentation_metrics import dice_from_counts, overlap_counts

    chosen: dict[str, float] = {}
    gains: dict[str, float] = {}
    for k, target in enumerate(targets):
        scores = {t: float(np.mean([dice_from_counts(overlap_counts(mask[k], (p[k] > t).astype(np.uint8)))
                                    for mask, p in zip(masks, probabilities)]))
                  for t in sorted({*grid, 0.5})}
        best = max(scores[t] for t in grid)
        chosen[target] = min((t for t in grid if scores[t] >= best - 1e-9), key=lambda t: abs(t - 0.5))
        gains[f"val_dice_{target}_at_0.5"] = scores[0.5]
        gains[f"val_dice_{target}_at_threshold"] = scores[chosen[target]]
    return float(np.mean([gains[f"val_dice_{t}_at_threshold"] for t in targets])), chosen, gains
