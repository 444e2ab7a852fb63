"""The one-standard-error rule: a search promotes its recipe (the space's first initial point that
qualifies) unless a sampled trial beats it by more than the validation score's standard error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tune_cells.analysis.selection import (
    balanced_accuracy_se,
    is_rule_note,
    prefer_recipe,
    recipe_for_asha,
    rule_applies,
)
from tune_cells.kinds import CLASSIFICATION, SEGMENTATION
from tune_cells.ray_backend import SearchResult, TrialSummary
from tune_cells.search_spaces import point_matches

RECIPE = {"model": "mobilenet_v2", "lr": 5.0e-4}
SEED_NET = {"model": "resnet50", "lr": 1.0e-3}
COUNTS = [40, 180, 35, 140]  # nuclei's validation part, about


def trial(trial_id: str, score: float, **config) -> TrialSummary:
    return TrialSummary(trial_id, {"image_size": 96, **config}, 10, False, None, best_checkpoint=f"ckpt-{trial_id}",
                        best_metric=score, best_epoch=7)


def search(*trials: TrialSummary) -> SearchResult:
    best = max(trials, key=lambda t: t.best_metric)
    return SearchResult(best.trial_id, best.config, best.best_metric, best.best_epoch, best.best_checkpoint,
                        list(trials), "ray/search", len(trials))


def rule(result: SearchResult, points: list[dict], counts=COUNTS):
    """The one-SE rule as a classification search applies it (its margin from the validation counts)."""
    return prefer_recipe(result, points, balanced_accuracy_se(result.best_metric, counts), "max")


def test_the_standard_error_of_a_balanced_accuracy_follows_the_smallest_classes():
    se = balanced_accuracy_se(0.96, COUNTS)
    assert se == pytest.approx(math.sqrt(sum(0.96 * 0.04 / n for n in COUNTS)) / 4)
    assert 0.01 < se < 0.02  # one validation image of a small class moves the score by ~0.6 points
    # a perfect score counts as one error per class short of it: never a zero error
    assert balanced_accuracy_se(1.0, COUNTS) == pytest.approx(
        math.sqrt(sum((1 - 1 / n) / n / n for n in COUNTS)) / 4)
    assert balanced_accuracy_se(1.0, [15, 15]) > 1 / 30  # leukemia: one validation image is within it
    assert balanced_accuracy_se(0.9, [10_000] * 4) < balanced_accuracy_se(0.9, [100] * 4)


def test_a_sampled_trial_within_one_standard_error_gives_way_to_the_recipe():
    result = search(trial("sampled", 0.9663, model="mobilenet_v2", lr=1.04e-3), trial("recipe", 0.9643, **RECIPE))
    chosen, note = rule(result, [RECIPE, SEED_NET])
    assert chosen.best_trial_id == "recipe" and chosen.best_checkpoint == "ckpt-recipe"
    assert chosen.best_metric == 0.9643 and chosen.best_config["lr"] == 5.0e-4
    assert "promoted the space's initial point 1 (mobilenet_v2)" in note and "sampled" in note


def test_a_perfect_sampled_trial_one_image_ahead_on_a_small_validation_part_gives_way_to_the_recipe():
    result = search(trial("sampled", 1.0, model="mobilenet_v2", lr=1.04e-3), trial("recipe", 0.9667, **RECIPE))
    chosen, note = rule(result, [RECIPE], [15, 15])
    assert chosen.best_trial_id == "recipe" and "within one standard error" in note


def test_a_sampled_trial_that_clearly_beats_every_recipe_is_promoted():
    result = search(trial("sampled", 0.99, model="mobilenet_v2", lr=1.04e-3), trial("recipe", 0.93, **RECIPE),
                    trial("seed", 0.94, **SEED_NET))
    chosen, note = rule(result, [RECIPE, SEED_NET])
    assert chosen is result and "beats every initial point" in note


def test_the_first_initial_point_is_preferred_and_the_best_recipe_stays():
    result = search(trial("seed", 0.965, **SEED_NET), trial("recipe", 0.960, **RECIPE))
    assert rule(result, [RECIPE, SEED_NET])[0].best_trial_id == "recipe"
    best_is_recipe = search(trial("recipe", 0.97, **RECIPE), trial("sampled", 0.969, model="resnet18"))
    chosen, note = rule(best_is_recipe, [RECIPE])
    assert chosen is best_is_recipe and "the best trial is the space's initial point 1" in note


def test_a_recipe_stopped_before_its_weight_average_never_beats_an_averaged_best():
    """Lung's trials offer only their averaged epochs (promotion_rank): an initial point that ASHA or
    the time budget stopped before its average scored its trained weights, which rank below."""
    from dataclasses import replace

    from tune_cells.promotion_rank import PROMOTION_SCORE, promotion_score

    def scored(summary: TrialSummary, offered: bool) -> TrialSummary:
        return replace(summary, best_metrics={"val_dice": summary.best_metric,
                                              PROMOTION_SCORE: promotion_score(summary.best_metric, "max", offered)})

    averaged, early = scored(trial("sampled", 0.80, lr=3e-3), True), scored(trial("recipe", 0.81, **RECIPE), False)
    result = replace(search(averaged, early), best_trial_id="sampled", best_config=averaged.config, best_metric=0.80,
                     best_metrics=averaged.best_metrics)  # as ray_backend ranks them
    chosen, note = prefer_recipe(result, [RECIPE], 0.05, "max")
    assert chosen.best_trial_id == "sampled" and "beats every initial point" in note
    late = scored(trial("recipe", 0.78, **RECIPE), True)  # the same recipe with its average, within the margin
    chosen, note = prefer_recipe(replace(result, trials=[averaged, late]), [RECIPE], 0.05, "max")
    assert chosen.best_trial_id == "recipe" and "promoted the space's initial point 1" in note


def test_failed_recipes_no_points_and_no_margin_leave_the_best_trial():
    failed = TrialSummary("recipe", dict(RECIPE), 1, True, "diverged")
    result = search(trial("sampled", 0.97, model="resnet18"), failed)
    assert rule(result, [RECIPE])[0] is result
    assert rule(result, []) == (result, "")
    assert prefer_recipe(result, [RECIPE], None, "max") == (result, "")


def test_a_point_matches_its_own_parameters_only():
    assert point_matches({"lr": 5e-4, "model": "mobilenet_v2"}, {"lr": 0.0005, "model": "mobilenet_v2", "width": 3})
    assert not point_matches({"lr": 5e-4}, {"lr": 5.1e-4})
    assert not point_matches({"lr": 5e-4, "depth": 2}, {"lr": 5e-4})
    assert not point_matches({}, {"lr": 5e-4})


def test_classification_counts_validation_images_per_class():
    from tune_cells.trainables.classification import ClassificationData

    images = np.zeros((6, 8, 8, 3), np.uint8)
    data = ClassificationData(images, np.array([0, 0, 1, 1, 2, 2]), images[:4], np.array([0, 2, 2, 2]), "t",
                              ["a", "b", "c"], 3, 8, (0.0,) * 3, (1.0,) * 3, 2, 0)
    assert CLASSIFICATION.selection_counts(data) == [1, 0, 3]
    folded = ClassificationData(images, np.array([0, 0, 1, 1, 2, 2]), images[:0], np.array([], np.int64), "t",
                                ["a", "b", "c"], 3, 8, (0.0,) * 3, (1.0,) * 3, 2, 0, fold_of=np.array([0, 1] * 3))
    assert CLASSIFICATION.selection_counts(folded) == [2, 2, 2]
    result = search(trial("recipe", 0.9, **RECIPE))
    assert CLASSIFICATION.compares_with_recipe(data)
    assert CLASSIFICATION.selection_error(data, result) == balanced_accuracy_se(0.9, [1, 0, 3])


def test_the_dice_standard_error_is_the_spread_of_the_per_image_scores():
    from tune_cells.analysis.segmentation_metrics import per_image_dice_se, segmentation_scores

    truth = np.zeros((2, 8, 8), np.uint8)
    truth[:, :4] = 1
    half = truth.copy()
    half[:, :2] = 0  # Dice 2/3 on both targets
    _, rows = segmentation_scores([truth, truth, truth], [truth, half, truth], ["a", "b"], "val_")
    per_image = [1.0, 2 / 3, 1.0]
    assert per_image_dice_se(rows, 3) == pytest.approx(np.std(per_image, ddof=1) / math.sqrt(3))
    assert math.isnan(per_image_dice_se(segmentation_scores([truth], [half], ["a", "b"], "val_")[1], 1))


def test_segmentation_gives_way_to_the_recipe_within_the_dice_spread_of_its_validation_fields():
    """Lung (2026-11-30): the best trial led the recipe by 0.010 mean Dice on 2 validation fields."""
    from tune_cells.trainables.segmentation import SegmentationData

    field = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((2, 8, 8), np.uint8)
    data = SegmentationData([field] * 6, [mask] * 6, [field] * 2, [mask] * 2, "lung", ["a", "b"], (0.5,) * 3,
                            (0.2,) * 3, 20, 0)
    assert SEGMENTATION.compares_with_recipe(data)
    assert not SEGMENTATION.compares_with_recipe(SegmentationData([field] * 6, [mask] * 6, [field], [mask], "lung",
                                                                  ["a", "b"], (0.5,) * 3, (0.2,) * 3, 20, 0))
    best = trial("sampled", 0.867, lr=8.2e-4)
    best.best_metrics = {"val_dice": 0.867, "val_dice_se": 0.021}
    result = search(best, trial("recipe", 0.857, **RECIPE))
    result.best_metrics = best.best_metrics
    chosen, note = prefer_recipe(result, [RECIPE], SEGMENTATION.selection_error(data, result), "max")
    assert chosen.best_trial_id == "recipe" and "within one standard error (0.0210)" in note
    result.best_metrics = {"val_dice": 0.867}  # a trial from before the error was reported: the best trial
    assert SEGMENTATION.selection_error(data, result) is None


def test_the_rule_applies_with_a_recipe_an_error_and_no_latency_budget_and_its_notes_say_so():
    """One predicate for the promotion, ASHA and the card, so the three cannot drift apart."""
    from tune_cells.trainables.segmentation import SegmentationData

    field, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8)
    two, one = ([field] * 2, [mask] * 2), ([field], [mask])
    data = {n: SegmentationData([field] * 6, [mask] * 6, *v, "lung", ["a", "b"], (0.5,) * 3, (0.2,) * 3, 20, 0)
            for n, v in (("two", two), ("one", one))}
    assert rule_applies(SEGMENTATION, data["two"], [RECIPE], None)
    assert not rule_applies(SEGMENTATION, data["one"], [RECIPE], None)  # one field: no error to compare within
    assert not rule_applies(SEGMENTATION, data["two"], [], None)  # no recipe
    assert not rule_applies(SEGMENTATION, data["two"], [RECIPE], 5.0)  # a latency budget chooses
    assert rule_applies(CLASSIFICATION, None, [RECIPE], None)
    result = search(trial("sampled", 0.867, lr=8.2e-4), trial("recipe", 0.857, **RECIPE))
    notes = [prefer_recipe(result, [RECIPE], se, "max")[1] for se in (0.02, 0.001)]
    assert all(is_rule_note(n) for n in notes) and not is_rule_note("")


def test_with_folds_each_fold_needs_two_fields_and_the_errors_combine_as_a_means():
    from tune_cells.trainables.segmentation import SegmentationData
    from tune_cells.trainables.skeleton import FoldEnsembleTrainer

    field, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8)
    pooled = dict(train_images=[field] * 8, train_masks=[mask] * 8, val_images=[], val_masks=[], task="lung",
                  targets=["a", "b"], mean=(0.5,) * 3, std=(0.2,) * 3, max_epochs=20, seed=0)
    assert SEGMENTATION.compares_with_recipe(SegmentationData(**pooled, fold_of=np.array([0, 0, 1, 1, 2, 2, 2, 2])))
    assert not SEGMENTATION.compares_with_recipe(SegmentationData(**pooled, fold_of=np.array([0, 1, 1, 1, 2, 2, 2, 2])))
    folds = [{"val_dice": 0.8, "val_dice_se": 0.03, "epoch_time_s": 1.0}, {"val_dice": 0.9, "val_dice_se": 0.04,
                                                                         "epoch_time_s": 2.0}]
    mean = FoldEnsembleTrainer.mean(folds)
    assert mean["val_dice"] == pytest.approx(0.85) and mean["val_dice_se"] == pytest.approx(0.025)  # sqrt(.03²+.04²)/2


ASHA = {"time_attr": "training_iteration", "metric": "acc", "mode": "max", "max_t": 10, "grace_period": 1,
        "reduction_factor": 2}


def asha_decisions(scheduler) -> list[str]:
    """A sampled trial ahead at the first rung, the recipe (lr 5e-4) behind it, a third trial further
    behind, then the recipe at its last epoch: what `scheduler` says to each result."""
    from ray.tune.experiment import Trial

    sampled, recipe, behind = (Trial("__fake", config={"lr": lr}, stub=True) for lr in (4e-3, 5e-4, 1e-2))
    for trial in (sampled, recipe, behind):
        scheduler.on_trial_add(None, trial)
    return [scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "acc": acc})
            for trial, epoch, acc in ((sampled, 1, 0.9), (recipe, 1, 0.1), (behind, 1, 0.05), (recipe, 10, 0.1))]


def test_asha_ranks_the_recipe_but_never_stops_it_before_its_last_epoch():
    """The rule compares sampled trials with the recipe's whole run: ASHA stopped leukemia's recipe at
    epoch 4 of 20 in two outer folds, and the sampled trials promoted there missed 4 of 60 test images."""
    from ray.tune.schedulers import ASHAScheduler

    from tune_cells.ray_scheduler import ASHAKeepingRecipe

    # behind at the rung: plain ASHA stops the recipe; both stop the sampled trial behind it (its score counted)
    assert asha_decisions(ASHAScheduler(**ASHA)) == ["CONTINUE", "STOP", "STOP", "STOP"]
    keeping = ASHAKeepingRecipe(recipe={"lr": 5e-4}, **ASHA)
    assert asha_decisions(keeping) == ["CONTINUE", "CONTINUE", "STOP", "STOP"]
    assert keeping._num_stopped == 2  # the behind trial and the recipe at its last epoch

    import ray.cloudpickle

    assert ray.cloudpickle.loads(ray.cloudpickle.dumps(keeping)).recipe == {"lr": 5e-4}  # restored on --resume


def test_under_a_latency_budget_asha_gets_no_recipe_and_stops_the_recipe_trial_like_any_other():
    """--max-latency-ms: the budget, not the one-SE rule, picks the champion, so the recipe needs no
    whole run to be compared against; the search hands ASHA `recipe_for_asha`'s answer."""
    from ray.tune.schedulers import ASHAScheduler

    from tune_cells.ray_scheduler import ASHAKeepingRecipe
    from tune_cells.trainables.segmentation import SegmentationData

    field, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8)
    data = SegmentationData([field] * 6, [mask] * 6, [field] * 2, [mask] * 2, "lung", ["a", "b"], (0.5,) * 3,
                            (0.2,) * 3, 20, 0)  # two validation fields: without a budget the rule applies
    untried = [{"lr": 5e-4}, {"lr": 1e-2}]
    recipes = {budget: recipe_for_asha(SEGMENTATION, data, untried, budget) for budget in (None, 5.0)}
    assert recipes == {None: {"lr": 5e-4}, 5.0: None}
    plain = asha_decisions(ASHAScheduler(**ASHA))
    assert asha_decisions(ASHAKeepingRecipe(recipe=recipes[5.0], **ASHA)) == plain == [
        "CONTINUE", "STOP", "STOP", "STOP"]  # the recipe stopped at the first rung, as a sampled trial is
    assert asha_decisions(ASHAKeepingRecipe(recipe=recipes[None], **ASHA)) != plain  # without: kept to max_t


@pytest.mark.slow
def test_a_real_search_records_which_rule_chose_its_champion(searched):
    """The shared demo search (two initial points): the search run says how its trial was chosen,
    and the champion is its promoted trial's."""
    client, experiment = searched["client"], searched["experiment"]
    parent = client.search_runs([experiment.experiment_id], "tags.`tune_cells.run_type` = 'search'")[0]
    tags = parent.data.tags
    assert tags["selection"].startswith("one-SE rule: ")
    champion = client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    assert champion.tags["ray_trial_id"] == tags["best_trial_id"]
    if tags["best_trial_id"] != tags["best_trial_overall"]:  # a recipe within one standard error was kept
        assert "promoted the space's initial point 1" in tags["selection"]
        assert "Promoted trial" in tags["mlflow.note.content"]
    assert "Promoted trial" in searched["result"].out or tags["best_trial_id"] == tags["best_trial_overall"]


def test_a_class_of_one_validation_image_still_counts_in_the_error():
    """1 - 1/n capped such a class at 0 and its variance with it: counts [1, 1, 1] gave an error of 0,
    so any sampled trial beat the recipe "by more than 0.0000" (a read-only audit, session 20)."""
    assert balanced_accuracy_se(0.667, [1, 1, 1]) == pytest.approx(math.sqrt(3 * 0.25) / 3)
    assert balanced_accuracy_se(0.9, [30, 30, 1]) > 0.1  # a Monte-Carlo error of about 0.10, not 0.026


def test_of_two_trials_of_one_initial_point_its_best_speaks_for_it():
    """The first matching trial in list order was promoted, even where the best trial itself was
    the point's (a point repeated, or a warm start's earlier trial)."""
    result = search(trial("first", 0.90, **RECIPE), trial("second", 0.95, **RECIPE))
    chosen, note = rule(result, [RECIPE])
    assert chosen.best_trial_id == "second" and "the best trial is the space's initial point 1" in note
    result = search(trial("first", 0.90, **RECIPE), trial("second", 0.95, **RECIPE),
                    trial("sampled", 0.96, model="mobilenet_v2", lr=2.0e-3))
    chosen, note = prefer_recipe(result, [RECIPE], 0.07, "max")
    assert chosen.best_trial_id == "second" and "(trial second, 0.9500)" in note


def test_an_ensemble_of_trials_takes_the_next_best_that_trained_every_epoch_and_read_their_input_alike():
    """`ensemble_members: trials`: never the promoted trial itself, nor one stopped early (by ASHA or
    the time budget), failed, without a checkpoint or a finite score, or fed another image size."""
    import dataclasses

    from tune_cells.analysis.trial_ensemble import complete_trials

    champion = trial("champ", 0.90, **RECIPE)
    better = trial("better", 0.95, **SEED_NET)  # above the champion (the one-SE rule promoted the recipe): still a member
    second = trial("second", 0.91, **SEED_NET)
    stopped = dataclasses.replace(trial("stopped", 0.99, **SEED_NET), iterations=4)
    failed = dataclasses.replace(trial("failed", 0.99, **SEED_NET), failed=True)
    no_checkpoint = dataclasses.replace(trial("nockpt", 0.99, **SEED_NET), best_checkpoint=None)
    nan = trial("nan", math.nan, **SEED_NET)
    larger = trial("larger", 0.99, **{**SEED_NET, "image_size": 128})
    result = dataclasses.replace(search(champion, better, second, stopped, failed, no_checkpoint, nan, larger),
                                 best_trial_id="champ", best_config=champion.config)
    picked = complete_trials(result, 3, max_epochs=10, mode="max")
    assert [t.trial_id for t in picked] == ["better", "second"]
    assert [t.trial_id for t in complete_trials(result, 2, 10, "max")] == ["better"]
    assert complete_trials(result, 1, 10, "max") == []
    assert [t.trial_id for t in complete_trials(result, 3, 10, "min")] == ["second", "better"]  # a loss: lowest first
    assert [t.trial_id for t in complete_trials(result, 5, 10, "max")] == ["better", "second"]  # fewer qualify: the caller retrains
