"""Lung segmentation end to end on generated data in the LungNeuralNet layout: search (real Ray,
Optuna, ASHA, MLflow), promotion, the held-out evaluation with masks/overlays/pixel counts,
`predict`, and the registered pyfunc's table."""

from __future__ import annotations

import signal

import pandas as pd
import pytest

from tune_cells.data.demo import generate_lung

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow

SPACE = """
params:
  model: unet
  encoder: resnet18
  depth: 3
  base_width: {choices: [8, 16]}
  loss: {choices: [bce_dice, dice]}
  optimizer: adamw
  lr: {float: [1.0e-3, 3.0e-3], log: true}
  lr_schedule: constant
  batch_size: 4
  views_per_epoch: 8
  scale: 0.5
  tile_size: 128
  overlap: 0.25
  batchnorm_views: 4
  swa_start: 0.5  # of 2 epochs: epoch 2 is the first average, the only epoch offered for promotion
  ensemble: 2  # as the lung space: the champion and the other trial (both train every epoch), one registered model
  ensemble_members: trials
initial_points:
  - {base_width: 8, loss: bce_dice, lr: 2.0e-3}
"""


@pytest.fixture(scope="module")
def lung_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("lung")
    data = generate_lung(root / "data", images=10, size=(160, 120))
    (root / "space.yaml").write_text(SPACE)
    workdir = root / "work"
    search = ["search", "lung", "--data", data, "--samples", 2, "--max-epochs", 2, "--grace-period", 2,
              "--space", root / "space.yaml", "--workdir", workdir]
    # killed (driver and Ray) once the ensemble of trials is joined, before anything is registered;
    # --resume rebuilds it from the trials' checkpoints and completes the promotion
    killed = cli_subprocess(search, cwd=root, env_extra={"TUNE_CELLS_FAIL_AT": "ensembled"}, new_session=True)
    assert killed.code == -signal.SIGKILL, killed.err[-3000:]
    client = store_client(workdir / "mlflow.db")
    registered_when_killed = len(client.search_model_versions("name='tune-cells-lung'"))
    result = cli_subprocess([*search, "--resume"], cwd=root)
    assert result.code == 0, result.err[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("tune-cells-lung").experiment_id])
    return {"root": root, "data": data, "workdir": workdir, "client": client, "runs": runs, "result": result,
            "killed": killed, "registered_when_killed": registered_when_killed}


def test_split_is_by_source_image_6_2_2(lung_search):
    import json

    split_file = next((lung_search["workdir"] / "splits").glob("lung-*.json"))
    parts = json.loads(split_file.read_text())
    assert [len(parts[p]) for p in ("train", "val", "test")] == [6, 2, 2]
    assert all(p.startswith("train/Original/") for part in ("train", "val", "test") for p in parts[part])


def test_trials_report_dice_per_target(lung_search):
    trials = [r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "trial"]
    assert len(trials) == 2
    for run in trials:
        for key in ("val_dice", "val_dice_Parenchyma", "val_dice_SevereInflammation", "val_jaccard", "val_pooled_dice"):
            assert 0.0 <= run.data.metrics[key] <= 1.0
        assert 0.0 <= run.data.metrics["val_dice_se"] <= 0.5  # over the 2 validation fields


def test_the_report_ranks_each_trial_by_the_epochs_it_offered_for_promotion(lung_search):
    root, workdir, client = lung_search["root"], lung_search["workdir"], lung_search["client"]
    result = cli_subprocess(["report", "--experiment", "tune-cells-lung", "--workdir", workdir], cwd=root)
    assert result.code == 0, result.err[-2000:]
    search = next(r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "search")
    table = pd.read_csv(workdir / "reports" / search.info.run_name / "trials.csv").set_index("run_id")
    for run in (r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "trial"):
        dice = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_dice"), key=lambda m: m.step)]
        offered = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "offered_for_promotion"),
                                           key=lambda m: m.step)]
        assert offered == [0.0, 1.0][: len(dice)]  # epoch 1 trained weights, epoch 2 their average
        # the average's score (whatever epoch 1 scored: promotion_rank.promoted_value's unit test has it higher);
        # a trial stopped at epoch 1 has no average: that epoch's
        assert table.loc[run.info.run_id, "best_value"] == pytest.approx(dice[-1])


def test_the_one_se_rule_chooses_between_the_recipe_and_the_sampled_trial(lung_search):
    """Its margin is the best trial's val_dice_se, read back from what Ray kept with the checkpoint."""
    search = next(r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "search")
    assert search.data.tags["selection"].startswith("one-SE rule: "), search.data.tags["selection"]
    assert search.data.params["promotion_policy"].startswith("the one-SE rule")


def test_the_champion_is_registered_as_the_mean_of_itself_and_the_next_best_complete_trial(lung_search):
    """`ensemble: 2` with `ensemble_members: trials`: promotion joins the promoted trial's best
    checkpoint and the other trial's (both trained every epoch) into one model, trains nothing
    more, and chooses thresholds on their averaged maps; the version and the card name both
    members' trial runs. The first attempt was killed once the ensemble was joined: the resume
    rebuilt it and registered one version."""
    from tune_cells.model_io import load_spec
    from tune_cells.tracking import Tracker, model_checkpoint

    workdir, client = lung_search["workdir"], lung_search["client"]
    version = client.get_model_version_by_alias("tune-cells-lung", "champion")
    trials = {r.data.tags["ray_trial_id"]: r for r in lung_search["runs"]
              if r.data.tags.get("tune_cells.run_type") == "trial"}
    members = version.tags["ensemble_trials"].split(",")
    assert members[0] == version.tags["ray_trial_id"] and sorted(members) == sorted(trials)
    assert "ensemble_seeds" not in version.tags
    assert version.tags["ensemble_member_run_ids"].split(",") == [trials[t].info.run_id for t in members]
    assert not [r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "retrain"]
    for attempt in (lung_search["killed"], lung_search["result"]):  # joined again on --resume, not retrained
        assert "ensemble: 2: the promoted trial " in attempt.err
    assert lung_search["registered_when_killed"] == 0
    assert len(client.search_model_versions("name='tune-cells-lung'")) == 1
    search = next(r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "search")
    assert search.info.status == "FINISHED" and search.data.tags["resumes"] == "1"
    assert not (workdir / "promotion" / search.info.run_id).exists()  # the staged ensemble is gone
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlartifacts")
    uri = "models:/tune-cells-lung@champion"
    folder = model_checkpoint(tracker.download_model(uri, lung_search["root"] / "download"), uri)
    spec = load_spec(folder)
    assert spec.members == [f"trial-{t}" for t in members] and spec.thresholds
    for trial_id in members:  # each member is its own trial's configuration
        config = load_spec(folder / f"trial-{trial_id}").config
        assert {k: str(config[k]) for k in ("lr", "base_width", "loss")} == {
            k: trials[trial_id].data.params[k] for k in ("lr", "base_width", "loss")}
    assert not list(folder.rglob("optimizer.pt")) and not list(folder.rglob("trainer.pt"))
    card = cli_subprocess(["card", "lung", "--workdir", workdir, "--output", lung_search["root"] / "card.md"],
                          cwd=lung_search["root"])
    assert card.code == 0, card.err[-2000:]
    runs = ", ".join(f"trial {t} run `{trials[t].info.run_id}`" for t in members)
    assert (f"the mean of 2 networks: the promoted trial and the search's next-best trials that trained every epoch: "
            f"{','.join(members)}; their MLflow runs: {runs} |") in (lung_search["root"] / "card.md").read_text()
    text = (lung_search["root"] / "card.md").read_text()  # a segmenter's words, not a classifier's
    assert "| Output | a mask for each of 2 targets: Parenchyma, SevereInflammation |" in text
    assert "Research: marking Parenchyma, SevereInflammation in images" in text and "It marks only" in text


def test_evaluation_writes_masks_overlays_and_pixel_table(lung_search):
    evaluation = next(r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "evaluation")
    metrics = evaluation.data.metrics
    for key in ("test_dice", "test_pooled_dice", "test_dice_Parenchyma", "test_pooled_dice_SevereInflammation"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "test_dice" in lung_search["result"].out and "pixel counts" in lung_search["result"].out
    folder = next((lung_search["workdir"] / "evaluations").iterdir())
    table = pd.read_csv(folder / "pixel_counts.csv")
    assert len(table) == 2
    assert {"pixels_Parenchyma", "percent_Parenchyma", "truth_pixels_SevereInflammation", "dice_Parenchyma"} <= set(table)
    assert (table["width"] == 160).all() and (table["height"] == 120).all()  # stitched back to full size
    for stem in table["image"].map(lambda p: p.rsplit("/", 1)[-1].rsplit(".", 1)[0]):
        for suffix in ("overlay", "Parenchyma", "SevereInflammation"):
            assert (folder / f"{stem}_{suffix}.png").is_file()
    logged = {f.path for f in lung_search["client"].list_artifacts(evaluation.info.run_id, "evaluation")}
    assert "evaluation/pixel_counts.csv" in logged


def test_predict_and_pyfunc_share_the_prediction_path(lung_search):
    import mlflow.pyfunc

    workdir, image = lung_search["workdir"], next((lung_search["data"] / "train" / "Original").glob("*.jpg"))
    output = lung_search["root"] / "pred.csv"
    result = cli_subprocess(["predict", "lung", image, "--workdir", workdir, "--output", output], cwd=lung_search["root"])
    assert result.code == 0, result.err[-2000:]
    table = pd.read_csv(output)
    assert (lung_search["root"] / "pred-masks" / f"{image.stem}_overlay.png").is_file()
    mlflow.set_registry_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tune-cells-lung@champion")
    served = model.predict(pd.DataFrame({"path": [str(image)]}))
    assert served.loc[0, "pixels_Parenchyma"] == table.loc[0, "pixels_Parenchyma"]


def test_external_lung_set_is_scored_whole_and_explain_says_it_is_for_classifiers(lung_search, tmp_path):
    external = generate_lung(tmp_path / "external", images=3, size=(160, 120), seed=5)
    result = cli_subprocess(["evaluate", "lung", "--data", external, "--workdir", lung_search["workdir"],
                             "--bootstrap", 50], cwd=lung_search["root"])
    assert result.code == 0, result.err[-2000:]
    assert f"on 3 images of {external}" in result.out and "test_dice_Parenchyma" in result.out
    # its 3 fields are 3 animals (the name's number): too few groups for a CI, as on a test part
    assert "none: too few groups" in result.out, result.out
    image = next((external / "train" / "Original").glob("*.jpg"))
    refused = cli_subprocess(["explain", "lung", image, "--workdir", lung_search["workdir"]], cwd=lung_search["root"])
    assert refused.code == 2 and "explain supports classification tasks" in refused.err


def test_seeds_retrain_an_ensemble_champion_as_an_ensemble(lung_search):
    """`evaluate --seeds 2` on a champion of 2 networks trains 4 (two ensembles), not 2: each seed's
    score is comparable with the champion's. An ensemble of two trials retrains each member's own
    configuration (one Tune run each)."""
    storage = lung_search["root"] / "seeds-storage"
    result = cli_subprocess(["evaluate", "lung", "--seeds", 2, "--workdir", lung_search["workdir"],
                             "--storage", storage], cwd=lung_search["root"])
    assert result.code == 0, result.err[-2000:]
    trials = [d for experiment in storage.iterdir() for d in experiment.iterdir() if d.is_dir() and "seed=" in d.name]
    assert len(trials) == 4, sorted(d.name for d in trials)
    assert len(list(storage.iterdir())) == 2  # the two members' configurations
    assert "test_dice" in result.out and "±" in result.out
    # each of the 4 networks has its MLflow run under the search's, named by the evaluation run
    client = lung_search["client"]
    search = next(r for r in lung_search["runs"] if r.data.tags.get("tune_cells.run_type") == "search")
    retrains = client.search_runs([search.info.experiment_id], "tags.retrain_purpose = 'seeds_evaluation'")
    assert len(retrains) == 4 and {r.info.status for r in retrains} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in retrains} == {search.info.run_id}
    (evaluation,) = client.search_runs([search.info.experiment_id], "tags.evaluation_kind = 'seeds'")
    by_seed = {r.data.tags["seed"]: r.info.run_id for r in retrains}
    assert evaluation.data.tags["retrain_seeds"].split(",") == sorted(by_seed, key=int)
    assert evaluation.data.tags["retrain_run_ids"].split(",") == [by_seed[s] for s in sorted(by_seed, key=int)]
    assert all(r.data.tags["retrain_of_model"].startswith("models:/tune-cells-lung/") for r in retrains)
