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
    that Dice; a tie keeps none, 8 times cheaper. `allow_tta` False (a latency budget): none.
    The trial's `threshold_choice: one_se` keeps, per target, the threshold nearest its `threshold`
    whose Dice is within one standard error (over the fields) of the best, as the champion rule does
    with trials; `fixed` keeps its `threshold` for every target; `tta_choice` `always` or `never`
    skips the augmentation's choice (validation is then scored, not chosen on). Both written into
    the checkpoint's spec."""
    from tune_cells.model_io import save_spec
    from tune_cells.segmentation import ImageSegmenter

    segmenter = ImageSegmenter.from_checkpoint(checkpoint)
    config = segmenter.config  # the trial's: its threshold_choice and tta_choice
    grid = (config.threshold,) if config.threshold_choice == "fixed" else THRESHOLD_GRID
    one_se = config.threshold_choice == "one_se"
    rule = {"grid": grid, "anchor": config.threshold if one_se else 0.5, "one_se": one_se}
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
        choices[tta] = _best_thresholds([mask for _, mask, _ in fields], probabilities, segmenter.spec.classes, **rule)
    tta = max(choices, key=lambda name: choices[name][0])  # the first best: none on a tie
    score, chosen, gains = choices[tta]
    segmenter.spec.thresholds, segmenter.spec.tta = chosen, tta
    save_spec(checkpoint, segmenter.spec)
    # What each choice bought on validation (the A/Bs against 0.5 and against no augmentation), kept with the version.
    # validation_score: the task's metric (the targets' mean per-image Dice) as the model will predict
    return {"validation_score": score, **{f"threshold_{target}": value for target, value in chosen.items()}, **gains,
            "tta": tta, **{f"val_dice_tta_{name}": value[0] for name, value in choices.items()}}


def _best_thresholds(masks: list[np.ndarray], probabilities: list[np.ndarray], targets: list[str],
                     grid: tuple[float, ...] = THRESHOLD_GRID, anchor: float = 0.5,
                     one_se: bool = False) -> tuple[float, dict[str, float], dict[str, float]]:
    """Each target's threshold in `grid` with the best mean per-image Dice, the one nearest `anchor`
    among ties; or with `one_se`, the one nearest `anchor` (itself a candidate) among those within
    one standard error of the best (of the best threshold's per-image Dice over the fields; none
    below two fields). Why one SE: on 2 validation fields the best threshold is mostly noise
    (measured over 10 lung fields: README, Lung segmentation). Returned: the targets' mean of the
    chosen thresholds' Dice; the thresholds; and each target's Dice at 0.5 and at its threshold."""
    from tune_cells.analysis.segmentation_metrics import dice_from_counts, overlap_counts

    candidates = sorted({*grid, anchor}) if one_se else sorted(grid)
    chosen: dict[str, float] = {}
    gains: dict[str, float] = {}
    for k, target in enumerate(targets):
        per_image = {t: [dice_from_counts(overlap_counts(mask[k], (p[k] > t).astype(np.uint8)))
                         for mask, p in zip(masks, probabilities)] for t in sorted({*candidates, 0.5})}
        scores = {t: float(np.mean(dice)) for t, dice in per_image.items()}
        best = max(candidates, key=lambda t: (scores[t], -abs(t - anchor)))
        margin = float(np.std(per_image[best], ddof=1) / np.sqrt(len(masks))) if one_se and len(masks) > 1 else 0.0
        chosen[target] = min((t for t in candidates if scores[t] >= scores[best] - margin - 1e-9),
                             key=lambda t: abs(t - anchor))
        gains[f"val_dice_{target}_at_0.5"] = scores[0.5]
        gains[f"val_dice_{target}_at_threshold"] = scores[chosen[target]]
    return float(np.mean([gains[f"val_dice_{t}_at_threshold"] for t in targets])), chosen, gains
