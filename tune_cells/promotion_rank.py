"""Which of a trial's epochs, and which trial, a search promotes: `promotion_score`, reported by every
epoch. Ray keeps and ranks each trial's checkpoints by it; the policy writes weights when it improves;
the search, the one-SE rule, the latency budget and `evaluate --seeds` read each trial's best by it.

It is the metric, oriented so that higher is better, lowered by PROMOTION_PENALTY on epochs a trainer
does not offer for promotion (a weight-averaging trial's epochs before its average: smoother weights,
not a higher score on two validation fields, should win). So any offered epoch ranks above every
other, and the metric decides within each group; a trial stopped before its first offered epoch is
still ranked by its metric. Metrics must stay far below the penalty in size (Dice, accuracy: within 1).
"""

from __future__ import annotations

PROMOTION_SCORE = "promotion_score"
PROMOTION_PENALTY = 1e6
OFFERED_FOR_PROMOTION = "offered_for_promotion"  # 1/0 per epoch in each trial's MLflow run (the score's mark, readable)


def promotion_score(value, mode: str, offered: bool = True) -> float:
    """`value` (the search's metric) as PROMOTION_SCORE: higher is better in either mode; NaN stays NaN."""
    score = float(value) if mode == "max" else -float(value)
    return score if offered else score - PROMOTION_PENALTY


def checkpoint_rank(metrics: dict, metric: str, mode: str) -> float:
    """What an epoch reported, as its PROMOTION_SCORE (epochs of older trials: from the metric alone)."""
    return _rank(metrics, metrics[metric], mode)


def offered(metrics: dict) -> bool:
    """Whether an epoch's weights were offered for promotion (epochs of older trials all were)."""
    score = metrics.get(PROMOTION_SCORE)
    return not isinstance(score, (int, float)) or score > -PROMOTION_PENALTY / 2


def promoted_value(values: list[float], offered_flags: list[bool] | None, mode: str) -> float:
    """A trial's best metric as promotion ranks its epochs: the best of its offered epochs where it has
    any (`offered_flags` beside `values`; None for older trials: all were), else the best of all."""
    pool = [v for v, o in zip(values, offered_flags or [], strict=False) if o] or values
    pool = [v for v in pool if v == v]  # NaN never best
    if not pool:
        return float("nan")
    return max(pool) if mode == "max" else min(pool)


def trial_rank(trial, mode: str) -> float:
    """A trial's (ray_backend.TrialSummary) best epoch as its PROMOTION_SCORE."""
    return _rank(trial.best_metrics, trial.best_metric, mode)


def _rank(metrics: dict, value, mode: str) -> float:
    score = metrics.get(PROMOTION_SCORE)
    return float(score) if isinstance(score, (int, float)) else promotion_score(value, mode)
