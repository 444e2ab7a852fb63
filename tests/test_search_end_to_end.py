"""The vertical slice with the real parts: Ray Tune + Optuna + ASHA + MLflow (sqlite), via the CLI.

One search on generated demo data is shared by the assertions below (it takes a minute or two).
"""

from __future__ import annotations

import json

import pytest

from tune_cells.data.reader import read_log_entries

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow

# Trial 1 learns; trials 2 and 3 cannot (lr 1e-7). With one trial at a time and ASHA's first
# rung after epoch 1, the hopeless trials reach the rung after the good one and are stopped.
SPACE = """
params:
  model: small_convnet
  depth: 2
  width: {choices: [12, 16]}
  dropout: 0.0
  optimizer: adamw
  lr: {float: [1.0e-3, 5.0e-3], log: true}
  weight_decay: 1.0e-4
  batch_size: 32
  lr_schedule: constant
  image_size: 40
  affine: 0.0
  color_jitter: 0.0
initial_points:
  - {width: 16, lr: 0.004}
  - {width: 12, lr: 1.0e-7}
  - {width: 16, lr: 1.0e-7}
"""
MAX_EPOCHS = 3


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    space = root / "space.yaml"
    space.write_text(SPACE)
    workdir = root / "work"
    result = cli_subprocess(
        ["search", "nuclei", "--samples", 3, "--max-epochs", MAX_EPOCHS, "--grace-period", 1,
         "--reduction-factor", 2, "--max-concurrent", 1, "--space", space, "--workdir", workdir,
         "--seed", 7],
        cwd=root,
    )
    assert result.code == 0, result.err[-3000:]
    client = store_client(workdir / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    runs = client.search_runs([experiment.experiment_id])
    return {"root": root, "workdir": workdir, "client": client, "runs": runs, "result": result}


def by_type(runs, kind):
    return [r for r in runs if r.data.tags.get("tune_cells.run_type") == kind]


def test_one_parent_three_children_with_full_metric_histories(search):
    client, runs = search["client"], search["runs"]
    parents = by_type(runs, "search")
    children = by_type(runs, "trial")
    assert len(parents) == 1 and len(children) == 3
    parent_id = parents[0].info.run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    trial_ids = [c.data.tags["ray_trial_id"] for c in children]
    assert len(set(trial_ids)) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        epochs = int(child.data.tags["epochs_run"])
        for metric in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in history] == list(range(1, epochs + 1)), metric
        assert child.data.params["optimizer"] == "adamw"
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.params["split_train"] and "split" in {a.path for a in client.list_artifacts(parent_id)}


def test_best_configuration_is_exported_as_a_pinned_space(search):
    from tune_cells.search_spaces import load_space

    parent = by_type(search["runs"], "search")[0]
    path = search["workdir"] / "best-configs" / "tune-cells-nuclei-demo" / f"{parent.info.run_id}.yaml"
    assert f"Pinned best configuration: {path}" in search["result"].out
    space = load_space(path)
    assert all(not isinstance(v, dict) for v in space.params.values())  # every parameter fixed
    assert space.params["lr"] == pytest.approx(0.004) and space.params["width"] == 16  # the good trial
    assert path.name in {a.path for a in search["client"].list_artifacts(parent.info.run_id)}


def test_hopeless_trials_are_stopped_early_by_asha(search):
    children = by_type(search["runs"], "trial")
    hopeless = [c for c in children if float(c.data.params["lr"]) < 1e-6]
    good = [c for c in children if float(c.data.params["lr"]) > 1e-6]
    assert len(hopeless) == 2 and len(good) == 1
    assert int(good[0].data.tags["epochs_run"]) == MAX_EPOCHS and "stopped_early" not in good[0].data.tags
    for child in hopeless:
        assert int(child.data.tags["epochs_run"]) < MAX_EPOCHS
        assert child.data.tags["stopped_early"] == "true"
    assert "3 trials (2 stopped early by ASHA, 0 failed)" in search["result"].out


def test_champion_is_the_best_trials_best_epoch(search):
    client = search["client"]
    version = client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    parent = by_type(search["runs"], "search")[0]
    good = [c for c in by_type(search["runs"], "trial") if float(c.data.params["lr"]) > 1e-6][0]
    assert version.tags["search_run_id"] == parent.info.run_id
    assert version.tags["trial_run_id"] == good.info.run_id
    history = client.get_metric_history(good.info.run_id, "val_balanced_accuracy")
    best = max(history, key=lambda m: (m.value, -m.step))
    assert float(version.tags["val_balanced_accuracy"]) == pytest.approx(best.value, abs=1e-6)
    assert int(version.tags["epoch"]) in [m.step for m in history if m.value == best.value]


def test_no_test_reads_before_promotion(search):
    client = search["client"]
    version = client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    promoted_at = version.creation_timestamp / 1000
    entries = read_log_entries(search["workdir"])
    assert {e["part"] for e in entries if e["time"] < promoted_at} == {"train", "val"}
    test_reads = [e for e in entries if e["part"] == "test"]
    assert test_reads and all(e["purpose"] == "evaluation" and e["time"] > promoted_at for e in test_reads)


def test_evaluate_in_a_fresh_process_reproduces_the_logged_metrics(search):
    client, workdir = search["client"], search["workdir"]
    first = by_type(search["runs"], "evaluation")
    assert len(first) == 1
    parent = by_type(search["runs"], "search")[0]
    assert first[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    artifacts = {a.path for a in client.list_artifacts(first[0].info.run_id)}
    assert {"confusion_matrix.png", "test_predictions.csv", "metrics.json"} <= artifacts

    again = cli_subprocess(["evaluate", "nuclei", "--workdir", workdir], cwd=search["root"])
    assert again.code == 0, again.err[-2000:]
    assert "test_balanced_accuracy" in again.out
    evaluations = by_type(client.search_runs([parent.info.experiment_id]), "evaluation")
    assert len(evaluations) == 2
    logged, recomputed = (sorted(evaluations, key=lambda r: r.info.start_time)[i].data.metrics for i in (0, 1))
    keys = [k for k in logged if k.startswith("test_")]
    assert "test_roc_auc" in keys and "test_f1_immune" in keys
    for key in keys:
        assert recomputed[key] == pytest.approx(logged[key], abs=1e-6), key


HOPELESS = SPACE.split("initial_points:")[0].replace("lr: {float: [1.0e-3, 5.0e-3], log: true}", "lr: 1.0e-7")


def test_a_second_search_keeps_the_first_and_the_champion_moves_only_when_better(search):
    """Another split is not comparable; a worse model on the same split (a smoke search) neither:
    both become `challenger`, the champion stays; `tune-cells promote` moves it by hand."""
    client, workdir, root = search["client"], search["workdir"], search["root"]
    model = "tune-cells-nuclei-demo"
    first_version = client.get_model_version_by_alias(model, "champion").version
    result = cli_subprocess(
        ["search", "nuclei", "--samples", 1, "--max-epochs", 1, "--space", root / "space.yaml",
         "--workdir", workdir, "--no-evaluate"], cwd=root)
    assert result.code == 0, result.err[-2000:]
    assert "as models:/tune-cells-nuclei-demo@challenger: not comparable with champion version" in result.out
    experiment = client.get_experiment_by_name(model)
    assert len(by_type(client.search_runs([experiment.experiment_id]), "search")) == 2
    assert len(list((workdir / "ray" / "tune-cells-nuclei-demo").iterdir())) == 2
    assert client.get_model_version_by_alias(model, "champion").version == first_version
    challenger = client.get_model_version_by_alias(model, "challenger")
    assert int(challenger.version) == int(first_version) + 1
    split_files = list((workdir / "splits").glob("nuclei-*-*.json"))
    assert len(split_files) == 2  # seed 7 and the default seed 0, each written once
    assert json.loads(split_files[0].read_text())["classes"][0] == "normal_epithelial"

    (root / "hopeless.yaml").write_text(HOPELESS)
    smoke = cli_subprocess(["search", "nuclei", "--smoke-test", "--seed", 7, "--space", root / "hopeless.yaml",
                            "--workdir", workdir, "--no-evaluate"], cwd=root)
    assert smoke.code == 0, smoke.err[-2000:]
    assert "@challenger: not better on validation" in smoke.out
    assert client.get_model_version_by_alias(model, "champion").version == first_version

    by_hand = cli_subprocess(["promote", "nuclei", challenger.version, "--workdir", workdir], cwd=root)
    assert by_hand.code == 0, by_hand.err
    champion = client.get_model_version_by_alias(model, "champion")
    previous = client.get_model_version_by_alias(model, "previous-champion")
    assert champion.version == challenger.version and previous.version == first_version
    assert "promoted by hand" in champion.tags["promotion_reason"]
    assert client.get_model_version(model, first_version).tags["promotion_reason"].startswith(
        f"champion until version {challenger.version} replaced it")
    again = cli_subprocess(["promote", "nuclei", f"0{challenger.version}", "--workdir", workdir], cwd=root)
    assert again.code == 0 and f"is version {challenger.version} already" in again.out, again.out + again.err
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.tags["previous_champion"] == str(first_version)  # not cleared by promoting it again
    assert str(client.get_model_version_by_alias(model, "previous-champion").version) == str(first_version)


def test_registered_pyfunc_predicts_paths_and_base64_like_evaluation(search):
    """Serving, predict and evaluate share one prediction path: same inputs, same probabilities."""
    import base64

    import mlflow.pyfunc
    import pandas as pd

    client = search["client"]
    evaluation = by_type(search["runs"], "evaluation")[0]
    local = client.download_artifacts(evaluation.info.run_id, "test_predictions.csv", str(search["root"]))
    expected = pd.read_csv(local).head(6)
    data_root = search["workdir"] / "demo-data" / "nuclei"
    paths = [str(data_root / p) for p in expected["path"]]
    mlflow.set_registry_uri(f"sqlite:///{search['workdir'] / 'mlflow.db'}")
    # The version that evaluation scored (a later test in this module registers another one).
    model = mlflow.pyfunc.load_model(evaluation.data.params["model_uri"])
    by_path = model.predict(pd.DataFrame({"path": paths}))
    encoded = [base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    by_bytes = model.predict(pd.DataFrame({"image": encoded}))
    prob_columns = [c for c in expected.columns if c.startswith("prob_")]
    assert list(by_path["predicted_class"]) == list(expected["predicted"]) == list(by_bytes["predicted_class"])
    for column in prob_columns:
        assert by_path[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)
        assert by_bytes[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)


def test_external_test_set_is_scored_whole(search, tmp_path):
    from tune_cells.data.demo import generate

    external = generate(tmp_path / "external", counts=(3, 3, 3, 3), seed=11)  # another dataset, same layout
    result = cli_subprocess(["evaluate", "nuclei", "--data", external, "--workdir", search["workdir"],
                             "--bootstrap", 50], cwd=search["root"])
    assert result.code == 0, result.err[-2000:]
    assert f"on 12 images of {external}" in result.out
    experiment = search["client"].get_experiment_by_name("tune-cells-nuclei-demo")
    runs = by_type(search["client"].search_runs([experiment.experiment_id]), "evaluation")
    external_runs = [r for r in runs if r.data.tags.get("evaluation_data") == "external"]
    assert len(external_runs) == 1 and external_runs[0].data.params["test_images"] == "12"
    assert any(e["part"] == "external" and e["images"] == 12 for e in read_log_entries(search["workdir"]))


# One search, two ways a trial fails; each fails alone, with its reason, and the third trial goes on.
FAILING_SPACE = """
params:
  model: small_convnet
  depth: 2
  width: 12
  optimizer: sgd
  lr: {float: [1.0e-3, 1.0e+20], log: true}
  batch_size: 32
  image_size: {choices: [32, 200000]}
  ensemble: 2  # its retrain under seed 100 diverges (the failpoint below)
initial_points:
  - {lr: 0.003, image_size: 32}
  - {lr: 1.0e+20, image_size: 32}  # BatchNorm keeps lr 1e6 finite; 1e20 overflows in the first steps
  - {lr: 0.003, image_size: 200000}  # one batch at 200000 px asks the allocator for terabytes: refused at once
"""


def test_failing_trials_fail_with_their_reasons_and_the_search_goes_on(tmp_path):
    """Also the champion's ensemble retrain (`ensemble: 2`, seed 0 + 100) diverging: the champion
    is promoted as one network, saying why; the retrain's run stays, FAILED."""
    (tmp_path / "space.yaml").write_text(FAILING_SPACE)
    result = cli_subprocess(["search", "nuclei", "--samples", 3, "--max-epochs", 2, "--max-concurrent", 1,
                             "--space", tmp_path / "space.yaml", "--workdir", tmp_path / "w", "--no-evaluate"],
                            cwd=tmp_path, env_extra={"TUNE_CELLS_FAIL_AT": "diverge:seed100"})
    assert result.code == 0, result.err[-2000:]
    assert "3 trials (0 stopped early by ASHA, 2 failed)" in result.out
    not_built = ("ensemble: 2: the retrain under seed 100 failed: diverged at epoch 1: training loss became nan "
                 "(failpoint diverge:seed100)")
    assert f"{not_built}; the champion is promoted as one network" in result.err
    client = store_client(tmp_path / 'w' / 'mlflow.db')
    experiment = client.get_experiment_by_name("tune-cells-nuclei-demo")
    trials = by_type(client.search_runs([experiment.experiment_id]), "trial")
    failed = {(float(t.data.params["lr"]), int(t.data.params["image_size"])): t.data.tags["failure"]
              for t in trials if t.info.status == "FAILED"}
    assert sorted(failed) == [(0.003, 200000), (1e20, 32)], failed
    assert "training loss became" in failed[(1e20, 32)]  # diverging
    assert "out of memory at batch_size 32 on cpu: try a smaller batch_size" in failed[(0.003, 200000)]
    champion = client.get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    (finished,) = [t for t in trials if t.info.status == "FINISHED"]
    assert champion.tags["trial_run_id"] == finished.info.run_id
    assert champion.tags["ensemble_not_built"] == not_built and "ensemble_seeds" not in champion.tags
    (retrain,) = by_type(client.search_runs([experiment.experiment_id]), "retrain")
    assert (retrain.info.status, retrain.data.tags["seed"]) == ("FAILED", "100")
