"""The scheduler side of the Ray adapter: ASHA, except for the space's fixed recipe.

The one-SE rule (analysis/selection.py) keeps the space's first initial point unless a sampled
trial beats it on validation by more than the standard error. That comparison means something only
if the recipe ran its whole budget. On leukemia's outer folds (2026-11-30, 12 x 20, two trials at a
time) ASHA stopped the recipe at its first rung (epoch 4 of a cosine schedule) in folds 0 and 2; a
sampled trial then won by 2-3 of 30 validation images and missed 4 of 60 test images, while the
four folds whose recipe ran 20 epochs scored 120/120. So ASHA ranks the recipe's results (other
trials are still stopped against them) but never stops it before --max-epochs.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tune_cells.search_spaces import point_matches


class ASHAKeepingRecipe(ASHAScheduler):
    """ASHAScheduler that lets trials of `recipe` (an initial point, in plain names) run to max_t.
    Module-level and plain data: Ray pickles the scheduler with the experiment (--resume)."""

    def __init__(self, *args, recipe: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe or {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t \
                and point_matches(self.recipe, trial.config):
            self._num_stopped -= 1  # counted by the parent before this veto
            return TrialScheduler.CONTINUE
        return action
