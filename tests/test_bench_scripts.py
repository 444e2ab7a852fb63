"""The A/B and recipe benchmarks (bench/bench_ab.py, bench/bench_recipe.py) build the spaces they
search from the shipped defaults: the recipe is the default's first initial point pinned, and each
A/B arm is an initial point of one space that differs from the recipe only where the arm says.
The outer folds (bench/bench_outer_folds.py) test every image once, groups whole. The old-code
A/B (bench/bench_old_code.py) really puts the old code back, and only for its arm. The refit bench
(bench/bench_refit.py) trains on what it says and never on the test part it scores. The threshold
rules (bench/bench_thresholds.py) choose on validation maps only, as promotion does; averaged
runs (bench/bench_map_ensemble.py) pair fields by their masks. The epoch bench
(bench/bench_last_epoch.py) changes recipe parameters by `--set`, never the ones it sets itself.
"""

import sys
from pathlib import Path

import pytest
import yaml

from tune_cells.preflight import check_space
from tune_cells.search_spaces import SearchSpace, load_space

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_ab  # noqa: E402
import bench_last_epoch  # noqa: E402
import bench_map_ensemble  # noqa: E402
import bench_old_code  # noqa: E402
import bench_outer_folds  # noqa: E402
import bench_postprocess  # noqa: E402
import bench_recipe  # noqa: E402
import bench_refit  # noqa: E402
import bench_thresholds  # noqa: E402


@pytest.fixture
def mobilenet_cached(tmp_path, monkeypatch):
    from tune_cells.models import expected_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNE_CELLS_OFFLINE", "1")
    cached = expected_weights_file("mobilenet_v2")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # its presence is what the spaces read; nothing is loaded here


def test_the_recipe_is_the_default_spaces_first_initial_point_pinned(mobilenet_cached):
    pinned = bench_recipe.recipe_space("nuclei")["params"]
    first = load_space("nuclei").initial_points[0]
    assert all(pinned[k] == v for k, v in first.items())
    assert not any(isinstance(v, dict) for v in pinned.values())  # nothing left to the sampler
    assert pinned["pretrained"] is True and pinned["image_size"] == 96


@pytest.mark.parametrize("plan", sorted(p.name for p in (BENCH / "ab").glob("*.yaml")))
def test_every_shipped_ab_file_makes_a_valid_space_of_its_arms(mobilenet_cached, plan):
    spec = yaml.safe_load((BENCH / "ab" / plan).read_text())
    assert spec["arms"][0] == {}  # the base first: every line is read against it
    space_dict = bench_ab.ab_space(spec["task"], spec["arms"], spec.get("space"), spec.get("base"))
    space = SearchSpace(params=space_dict["params"], source=plan, initial_points=space_dict["initial_points"])
    check_space(space, seed=0)
    base = bench_recipe.recipe_space(spec["task"], spec.get("space"), spec.get("base"))["params"]
    for arm, point in zip(spec["arms"], space.initial_points):
        assert {k: v for k, v in point.items() if base.get(k) != v} == arm


def test_outer_folds_test_every_image_once_keep_groups_whole_and_stratify():
    units = [([f"a{i}"], 0) for i in range(30)] + [([f"b{i}"], 1) for i in range(18)] + [(["g1", "g2"], 1)]
    folds = bench_outer_folds.outer_folds(units, 6, seed=0)
    images = [p for fold in folds for p in fold]
    assert sorted(images) == sorted(p for members, _ in units for p in members)  # each image in one fold
    assert any({"g1", "g2"} <= set(fold) for fold in folds)  # a group stays whole
    assert {sum(p.startswith("a") for p in fold) for fold in folds} == {5}  # classes spread evenly
    for k in range(6):
        parts = bench_outer_folds.fold_parts(folds, k)
        assert parts["test"] == folds[k] and parts["val"] == folds[(k + 1) % 6]
        assert not set(parts["train"]) & (set(parts["test"]) | set(parts["val"]))
        assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) == len(images)


def test_the_old_dice_lets_false_positives_on_empty_views_cost_nothing_and_is_undone():
    import torch

    from tune_cells.trainables import segmentation

    shipped = segmentation.soft_dice_loss
    # two targets; the second is absent from every view, and the network predicts it everywhere
    target = torch.zeros(4, 2, 8, 8)
    target[:, 0, :4] = 1
    logits = torch.where(target[:, :1].bool(), 6.0, -6.0).repeat(1, 2, 1, 1)
    logits[:, 1] = 6.0
    now = segmentation.SegmentationLoss("dice")(logits, target)
    undo = bench_old_code.CHANGES["dice-empty-views"].install()
    try:
        before = segmentation.SegmentationLoss("dice")(logits, target)
    finally:
        undo()
    assert segmentation.soft_dice_loss is shipped
    assert now > 0.45  # the empty target's false positives cost about half the loss
    assert before < 0.01  # smp's multilabel Dice dropped the empty target: the same mistake is free


def test_the_old_batchnorm_loop_is_put_back_and_undone():
    from tune_cells import training

    shipped = training.freeze_frozen_batchnorm
    undo = bench_old_code.CHANGES["frozen-bn"].install()
    try:
        assert training.freeze_frozen_batchnorm is not shipped
    finally:
        undo()
    assert training.freeze_frozen_batchnorm is shipped


def test_the_refit_arm_trains_on_training_and_validation_parts_and_scores_only_the_test_part(tmp_path):
    from tune_cells.data.demo import generate_lung
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.tasks import get_task

    task = get_task("lung")
    index = task.importer(generate_lung(tmp_path / "lung", images=10, size=(232, 174)))
    split = load_or_create_split(tmp_path / "split.json", index, 0)
    arms = {parts: bench_refit.prepared_arm(task, index, split, parts, {"seed": 0}, 128, 1, 0, tmp_path)
            for parts in (("train",), ("train", "val"))}
    sizes = {parts: (len(arm.inputs.data.train_images), len(arm.inputs.data.val_images)) for parts, arm in arms.items()}
    test = len(split.parts["test"])
    assert sizes == {("train",): (len(split.parts["train"]), test),
                     ("train", "val"): (len(split.parts["train"]) + len(split.parts["val"]), test)}


@pytest.mark.slow
def test_the_recipe_bench_reads_both_arms_test_predictions_and_pairs_them(searched):
    workdir = searched["workdir"]  # a stored search compared with itself: every image agrees
    images = len(bench_recipe.champion_test_predictions(workdir))
    assert images > 0
    assert bench_recipe.paired_line(workdir, workdir) == (
        f"paired on {images} test images: right only by the search 0, only by the recipe 0; McNemar exact "
        "p = 1.000: no difference this test part can show")


def test_threshold_rules_choose_on_validation_and_score_the_test_fields(tmp_path, capsys, monkeypatch):
    """Validation maps are separated above 0.7 for the one target; the test maps are then scored at the
    threshold chosen there, in field order (field 10 after field 9), and the augmented maps only where
    validation gains."""
    import numpy as np

    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, :4] = 1
    soft = np.where(truth == 1, 0.9, 0.7).astype(np.float16)  # 0.5 calls every pixel; 0.8 only the target
    kept = {f"{part}mask_{i}": truth for part in ("val_", "test_") for i in range(11)}
    kept.update({f"{arm}{part}{i}": soft for arm in ("swa_best_", "swatta_") for part in ("val_", "test_")
                 for i in range(11)})
    kept["swa_best_test_10"] = np.full_like(soft, 0.95)  # the last field: every pixel above any threshold
    (tmp_path / "fold-0").mkdir()
    np.savez_compressed(tmp_path / "fold-0" / "probabilities.npz", **kept)
    assert [m.max() for m in bench_thresholds.fold_maps(tmp_path / "fold-0" / "probabilities.npz")["swa_best_test_"]][-1] \
        == pytest.approx(0.95, abs=1e-3)
    monkeypatch.setattr(sys, "argv", ["bench_thresholds.py", str(tmp_path), "--targets", "t"])
    bench_thresholds.main()
    out = capsys.readouterr().out
    # 0.75-0.85 all separate them: the one nearest 0.5; a tie of the two maps keeps no augmentation
    assert "thresholds without augmentation [0.75]" in out and "promoted: none" in out
    assert "one-SE [0.75]" in out  # every validation field gains alike: no spread, so the rule moves too
    assert "0.5, no augmentation: t 0.6667" in out  # 2/3 on every field
    assert "thresholds chosen on validation, no augmentation: t 0.9697" in out  # (10 x 1 + 2/3) / 11


def test_the_epoch_bench_reads_set_values_as_yaml_and_refuses_what_it_sets_itself(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="bench_last_epoch.py")
    assert bench_last_epoch.recipe_changes(parser, ["scale=1.0", "tile_size=256", "loss=dice"]) \
        == {"scale": 1.0, "tile_size": 256, "loss": "dice"}
    for pair, culprit in (("swa_start=0.5", "--set swa_start"), ("seed=3", "--set seed"), ("scale", "--set scale"),
                          ("swa_lr=0.5", "use --swa-lr"), ("threshold=0.3", "--set threshold")):
        with pytest.raises(SystemExit) as exited:
            bench_last_epoch.recipe_changes(parser, [pair])
        assert exited.value.code == 2 and culprit in capsys.readouterr().err


def test_the_epoch_bench_refuses_a_misspelt_set_key_before_training(tmp_path, monkeypatch, capsys):
    """The trial's own parse is lenient (stored configurations of older versions), so the bench checks
    the changed recipe strictly: a typo exits 2 naming it, instead of a long run that changed nothing."""
    from tune_cells.data.demo import generate_lung

    data = generate_lung(tmp_path / "lung", images=10, size=(160, 120))
    monkeypatch.setattr(sys, "argv", ["bench_last_epoch.py", "lung", "--data", str(data), "--space", "lung-scratch",
                                      "--workdir", str(tmp_path / "w"), "--set", "scal=1.0"])
    with pytest.raises(SystemExit) as exited:
        bench_recipe.run_with_one_line_errors(bench_last_epoch.main)
    assert exited.value.code == 2 and "unknown parameter 'scal'" in capsys.readouterr().err
    assert not (tmp_path / "w" / "fold-0").exists()


def test_averaged_runs_pair_fields_by_their_masks_across_fold_deals(tmp_path, capsys):
    """Two runs that test the same two fields in other folds and order: averaging their maps pairs
    each field with itself (one run calls field A's target, the other misses it: the mean at 0.5 is
    the first run's call, where their thresholds agree)."""
    import numpy as np

    field_a, field_b = np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8)
    field_a[0, :4], field_b[0, :, :2] = 1, 1
    sure = {id(field_a): np.where(field_a == 1, 0.9, 0.0), id(field_b): np.where(field_b == 1, 0.9, 0.0)}
    for run, (first, second), scale in (("a", (field_a, field_b), 1.0), ("b", (field_b, field_a), 0.2)):
        for fold, field in enumerate((first, second)):
            folder = tmp_path / run / f"fold-{fold}"
            folder.mkdir(parents=True)
            maps = (sure[id(field)] * (scale if field is field_a else 1.0)).astype(np.float16)
            np.savez_compressed(folder / "probabilities.npz", val_mask_0=field, swatta_val_0=sure[id(field)].astype(
                np.float16), test_mask_0=field, swatta_test_0=maps)
    bench_map_ensemble.main([str(tmp_path / "a"), str(tmp_path / "b"), "--targets", "t"])
    out = capsys.readouterr().out.splitlines()
    scores = {line.split()[0] if "/" in line else line.rsplit(None, 1)[0].strip(): float(line.split()[-1])
              for line in out[1:]}
    assert scores[str(tmp_path / "a")] == 1.0 and scores[str(tmp_path / "b")] == 0.5  # b misses field A
    assert scores["maps averaged, 0.5"] == 1.0  # field A: (0.9 + 0.18) / 2 > 0.5; a mispairing would miss it


def test_post_processing_is_scored_per_option_and_chosen_on_validation(tmp_path, capsys):
    """One fold whose maps call the inflamed block and a 9-pixel speck beside it: removing regions under
    200 pixels makes the field exact, validation (the same maps) chooses it, and a second run without
    the first run's fold is refused in one usage line, exit 2."""
    import numpy as np

    mask = np.zeros((2, 64, 64), np.uint8)
    mask[0], mask[1, 10:30, 10:30] = 1, 1
    probabilities = (mask * 0.9).astype(np.float16)
    probabilities[1, 50:53, 50:53] = 0.9  # a false positive speck
    (tmp_path / "a" / "fold-0").mkdir(parents=True)
    np.savez_compressed(tmp_path / "a" / "fold-0" / "probabilities.npz", val_mask_0=mask, swatta_val_0=probabilities,
                        test_mask_0=mask, swatta_test_0=probabilities)
    bench_postprocess.main([str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "none                     0.9889" in out  # 2 x 400 / (400 + 409)
    assert "regions >= 200 px        1.0000  (higher on 1, lower on 0 fields than none)" in out
    assert "regions >= 800 px        0.0000" in out  # the 400-pixel block goes too
    assert "chosen on each fold's validation fields (regions >= 200 px): 1.0000" in out
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit) as exited:
        bench_postprocess.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert exited.value.code == 2 and "no probabilities.npz for fold-0" in capsys.readouterr().err
