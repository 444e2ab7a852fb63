"""Which trial a search promotes: the one-standard-error rule, with the space's initial points
(its fixed recipes) as the preferred models.

Measured on nuclei (2026-11-29): a sampled trial beat the recipe trial by one validation image
(0.9663 against 0.9643, about a fifth of a standard error) and scored 0.960 on the test part,
while the same recipe trained alone scored 0.995. A validation part of a few hundred images
cannot tell such trials apart, so the search keeps the recipe unless a sampled trial beats it by
more than the validation score's standard error (Breiman et al.'s one-SE rule, the initial points
standing in for the "simplest" model). The kind gives that error: classification from the
validation images per class behind the balanced accuracy; segmentation from the spread of Dice
over the validation fields (on lung's two fields about 0.02-0.05, while trials differ by 0.01: a
sampled trial chosen there scored 0.408 on the test fields' severe inflammation, the recipe
trained alone 0.47-0.59 at every epoch from the fifth, 2026-11-30).
"""

from __future__ import annotations

import math
from dataclasses import replace

from tune_cells.promotion_rank import offered
from tune_cells.search_spaces import point_matches

RULE = "one-SE rule"  # how each of the rule's log lines, and the promotion's `selection` tag, begins


def rule_applies(kind, data, initial_points: list[dict], max_latency_ms: float | None) -> bool:
    """Whether the one-SE rule chooses a search's champion: the space has a fixed recipe (an initial
    point), the kind can give the validation score an error on `data`, and no latency budget chooses
    instead. Asked by the promotion, by ASHA (which then lets the recipe run its whole budget) and by
    the model card's "Chosen by"."""
    return max_latency_ms is None and bool(initial_points) and kind.compares_with_recipe(data)


def recipe_for_asha(kind, data, untried_points: list[dict], max_latency_ms: float | None) -> dict | None:
    """The initial point ASHA lets run its whole budget (the first this search runs), where the rule
    will compare sampled trials with it; None under a latency budget or without one (ranked as any trial).
    Later points (nuclei's ResNet-50) are ranked as sampled trials are, to bound the cost on CPUs."""
    return untried_points[0] if rule_applies(kind, data, untried_points, max_latency_ms) else None


def is_rule_note(selection_tag: str) -> bool:
    """Whether a promotion's `selection` tag is one of `prefer_recipe`'s lines."""
    return selection_tag.startswith(RULE)


def balanced_accuracy_se(score: float, class_counts: list[int]) -> float:
    """Standard error of a balanced accuracy near `score`, from the images per class it averages:
    sqrt(sum_c p_c(1-p_c)/n_c) / K with class c's accuracy p_c taken as `score`, but at most
    1 - 1/n_c (one error). A perfect score on a few images is no proof of a perfect model: taken as
    1, it gave an error of 0, and on leukemia's 30 validation images a sampled trial at 1.000 then
    beat the recipe at 0.967 (one image) "by more than 0.0000" (measured 2026-11-30). A class of one
    image is taken at 0.5, the most a single image can vary."""
    counts = [n for n in class_counts if n > 0]
    if not counts or not 0.0 <= score <= 1.0:
        return 0.0
    # one image: 1 - 1/n would be 0 and that class's variance with it; 0.5 is its largest
    accuracies = [min(score, 1 - 1 / n if n > 1 else 0.5) for n in counts]
    return math.sqrt(sum(p * (1 - p) / n for p, n in zip(accuracies, counts))) / len(counts)


def prefer_recipe(result, initial_points: list[dict], se: float | None, mode: str):
    """`result` seen as the trial the one-SE rule promotes: the first initial point's trial (in
    the space's order) whose best score is within `se` (the best score's standard error; None: the
    rule does not apply) of the best trial's, else the best trial. Returns (result, a line for the
    log and the search run, or "")."""
    if se is None or not initial_points or mode != "max":
        return result, ""
    best = result.best_metric
    scored = [t for t in result.trials if not t.failed and t.best_checkpoint is not None and math.isfinite(t.best_metric)]
    # an initial point whose best epoch was not offered (stopped before its weight average) never beats an offered best
    best_offered = offered(result.best_metrics)
    for number, point in enumerate(initial_points, start=1):
        matching = [t for t in scored if point_matches(point, t.config)
                    and not (best_offered and not offered(t.best_metrics))]
        if any(t.trial_id == result.best_trial_id for t in matching):
            return result, f"{RULE}: the best trial is the space's {_name(number, point)}"
        if not matching:
            continue
        # several trials of one point (a point repeated, or a warm start's): its best speaks for it
        trial = max(matching, key=lambda t: t.best_metric)
        if best - trial.best_metric <= se:
            note = (f"{RULE}: promoted the space's {_name(number, point)} (trial {trial.trial_id}, "
                    f"{trial.best_metric:.4f}), within one standard error ({se:.4f}) of the best trial "
                    f"{result.best_trial_id} ({best:.4f})")
            return replace(result, best_trial_id=trial.trial_id, best_config=trial.config,
                           best_metric=trial.best_metric, best_epoch=trial.best_epoch,
                           best_checkpoint=trial.best_checkpoint, best_metrics=trial.best_metrics), note
    return result, f"{RULE}: the best trial {result.best_trial_id} beats every initial point by more than {se:.4f}"


def _name(number: int, point: dict) -> str:
    name = point.get("model", point.get("encoder"))  # lung's points name their encoder
    return f"initial point {number}" + (f" ({name})" if name else "")
