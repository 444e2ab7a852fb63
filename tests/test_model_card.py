"""The model card each evaluation writes, `tune-cells card`, and what the search's MLflow runs carry for
the UI (dataset inputs, sources, the champion's logged model, the summary): on the shared demo search."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import store_client

pytestmark = pytest.mark.slow


def runs_of(searched, run_type: str):
    return searched["client"].search_runs([searched["experiment"].experiment_id],
                                          f"tags.`tune_cells.run_type` = '{run_type}'")


def evaluation_run(searched):
    runs = [r for r in runs_of(searched, "evaluation") if "evaluation_kind" not in r.data.tags]
    return min(runs, key=lambda r: r.info.start_time)  # the search's own (a seeds run may come later)


def card_table(text: str) -> dict[str, tuple[str, str]]:
    """metric -> (value, CI) as the card's test-metrics table prints them."""
    section = text.split("## Test metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (test_\w+) \| ([0-9.]+) \| ([^|]*) \|$", section, flags=re.M)
    return {key: (value, ci.strip()) for key, value, ci in rows}


def test_the_card_is_logged_with_the_evaluation_and_its_numbers_are_the_runs(searched, run_cli):
    client, evaluation = searched["client"], evaluation_run(searched)
    version = client.get_model_version("tune-cells-nuclei-demo", "1")
    assert version.tags["model_card"] == f"runs:/{evaluation.info.run_id}/model_card.md"
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(evaluation.info.run_id, "model_card.md", tmp)).read_text()
        card_json = json.loads(Path(client.download_artifacts(evaluation.info.run_id, "model_card.json", tmp)).read_text())

    metrics = evaluation.data.metrics
    headline = {k: v for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high")) and k not in
                ("test_ece", "test_ece_before_temperature")}
    table = card_table(text)
    assert set(table) == set(headline)  # every metric the run logged, no other
    for key, value in headline.items():
        assert table[key][0] == f"{value:.4f}", key
        assert table[key][1] == f"[{metrics[key + '_ci_low']:.4f}, {metrics[key + '_ci_high']:.4f}]", key
    assert card_json["test_metrics"]["test_balanced_accuracy"]["value"] == metrics["test_balanced_accuracy"]
    assert card_json["test_metrics"]["test_roc_auc"]["ci95"] == [metrics["test_roc_auc_ci_low"],
                                                                  metrics["test_roc_auc_ci_high"]]
    assert f"{metrics['test_ece']:.4f} after" in text and f"{metrics['test_ece_before_temperature']:.4f} before" in text

    # What it says of the data, the search and its limits, from the split file and the search run.
    split_file = Path(version.tags["split_file"])
    split = json.loads(split_file.read_text())
    assert version.tags["split_sha256"] in text and split_file.name in text
    test_images = len(split["test"])
    assert f"On the {test_images} images of the test part" in text
    assert f"| all | {len(split['train'])} | {len(split['val'])} | {test_images} |" in text
    assert "4 trials ran" in text and "ASHA grace period 1 and reduction factor 2" in text
    assert "no patient, specimen or slide IDs" in text and "another stain, scanner" in text
    assert "synthetic demo images" in text
    assert "| Output | one of 4 classes: " in text and "It knows only " in text and "Research: sorting images" in text
    # the space has an initial point, so the one-SE rule chose, and the card says how it went
    search = client.get_run(version.tags["search_run_id"])
    assert ("| Chosen by | the one-SE rule: the space's first initial point that ran, unless the best trial by "
            f"val_balanced_accuracy leads it on validation by more than the standard error; its best-epoch checkpoint "
            f"({search.data.tags['selection']}) |") in text
    assert "tune-cells search nuclei --space" in text and "--seed 3" in text

    # `tune-cells card nuclei` prints the stored card (the champion), as does --version 1.
    result = run_cli("card", "nuclei", "--workdir", searched["workdir"])
    assert result.code == 0, result.err
    assert result.out == text
    assert run_cli("card", "nuclei", "--version", "1", "--workdir", searched["workdir"]).out == text
    written = searched["root"] / "cards" / "new-folder" / "card.md"  # --output into a folder not made yet
    assert run_cli("card", "nuclei", "--output", written, "--workdir", searched["workdir"]).code == 0
    assert written.read_text() == text


def test_a_card_whose_file_is_gone_is_built_again_from_its_evaluation(searched, run_cli, tmp_path, caplog):
    """The version points at a card its run no longer holds (deleted by hand): `card` says so in
    one warning and prints the card built again from the same evaluation run."""
    shutil.copy(searched["workdir"] / "mlflow.db", tmp_path / "mlflow.db")  # the artifacts stay where they are
    evaluation = evaluation_run(searched)
    stored = run_cli("card", "nuclei", "--workdir", searched["workdir"]).out
    store_client(tmp_path / "mlflow.db").set_model_version_tag("tune-cells-nuclei-demo", "1", "model_card",
                                                               f"runs:/{evaluation.info.run_id}/gone.md")
    result = run_cli("card", "nuclei", "--workdir", tmp_path)
    assert result.code == 0, result.err
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "tune_cells.analysis.model_card"]
    assert "gone.md" in warning and "building it again" in warning
    assert card_table(result.out) == card_table(stored) and result.out.startswith(stored.splitlines()[0])


def test_card_of_an_unknown_version_is_one_line_and_exit_2(searched, run_cli):
    result = run_cli("card", "nuclei", "--version", "99", "--workdir", searched["workdir"])
    assert result.code == 2 and result.out == ""
    assert len(result.err.strip().splitlines()) == 1 and "version 99" in result.err


def test_search_runs_carry_dataset_source_model_and_summary_for_the_ui(searched):
    client = searched["client"]
    experiment = client.get_experiment(searched["experiment"].experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.tune-cells"])
    assert view["selectedColumns"][0] == "metrics.`best_val_balanced_accuracy`"

    (search,) = runs_of(searched, "search")
    sha = search.data.tags["split_sha256"]
    evaluation = evaluation_run(searched)
    for run, context in [(search, "training"), *[(t, "training") for t in runs_of(searched, "trial")],
                         (evaluation, "testing")]:
        (given,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert given.dataset.digest == sha[:12] and given.dataset.name == "nuclei (split seed 3)"
        profile = json.loads(given.dataset.profile)
        assert profile["split_sha256"] == sha and profile["split_file"] == search.data.tags["split_file"]
        assert [t.value for t in given.tags if t.key == "mlflow.data.context"] == [context]
        command = "evaluate" if run is evaluation else "search"
        assert run.data.tags["mlflow.source.name"] == f"tune-cells {command} nuclei"
    assert evaluation.data.tags["mlflow.runType"] == "evaluation"  # the UI shows its search run expanded

    # The champion's logged model: an output of its trial and of the search run, an input of the evaluation.
    version = client.get_model_version("tune-cells-nuclei-demo", "1")
    model_id = version.source.removeprefix("models:/")
    for run_id in (search.info.run_id, version.tags["trial_run_id"]):
        assert model_id in [m.model_id for m in client.get_run(run_id).outputs.model_outputs]
    assert [m.model_id for m in client.get_run(evaluation.info.run_id).inputs.model_inputs] == [model_id]
    assert search.data.tags["model_uri"] == "models:/tune-cells-nuclei-demo/1"
    assert "(#/models/tune-cells-nuclei-demo/versions/1)" in search.data.tags["mlflow.note.content"]
    assert evaluation.info.run_id in search.data.tags["mlflow.note.content"]
    for key in ("test_balanced_accuracy", "test_accuracy", "test_ece"):  # the summary on the search's row
        assert search.data.metrics[key] == evaluation.data.metrics[key]


def test_an_experiment_made_before_the_kind_tag_gets_it_from_the_next_search(searched, tmp_path):
    from tune_cells.tracking import Tracker

    shutil.copy(searched["workdir"] / "mlflow.db", tmp_path / "mlflow.db")
    client = store_client(tmp_path / "mlflow.db")
    experiment_id = searched["experiment"].experiment_id
    client.delete_experiment_tag(experiment_id, "mlflow.experimentKind")
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    assert tracker.experiment_id("tune-cells-nuclei-demo") == experiment_id  # what a search asks first
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")  # a user's own choice stays
    tracker.experiment_id("tune-cells-nuclei-demo")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "genai_development"


def test_a_champion_with_averaged_weights_says_which_epochs_it_averages():
    from tune_cells.analysis.model_card_text import _averaged_weights

    config = {"swa_start": "0.5"}  # as MLflow holds a trial's parameters: strings
    assert _averaged_weights(config, "17", "20") == [("Weights", "the equal average of the weights after epochs 11-17 "
                                                     "(stochastic weight averaging, `swa_start` 0.5), BatchNorm "
                                                     "statistics recomputed on training views")]
    assert _averaged_weights(config, "9", "20") == []  # its best epoch came before the averaging
    assert _averaged_weights(config, "11", "20")[0][1].startswith("the equal average of the weights after epoch 11 (")
    assert _averaged_weights({}, "17", "20") == [] and _averaged_weights(config, "?", None) == []


def test_a_resumed_search_says_its_time_includes_the_interruption():
    import dataclasses

    from tune_cells.analysis.model_card_text import CardFacts, _search

    facts = CardFacts(task="nuclei", task_description="", model_name="m", version="1", version_tags={},
                      evaluation_run_id="e", evaluation_time="t", metrics={}, evaluation_params={}, search_run_id="s",
                      search_name="n", search_params={}, search_metrics={}, search_seconds=100.0, data={},
                      space_yaml="", config={}, experiment_id="1")
    assert "in 100 s (the search run, from its first trial to the promotion). " in _search(facts)
    resumed = _search(dataclasses.replace(facts, search_resumes=2))
    assert "promotion; resumed 2 time(s), so this includes the time it stood interrupted). " in resumed


def test_an_ensembles_card_names_each_members_seed_and_mlflow_run():
    """Its Ensemble row pairs `ensemble_seeds` with `ensemble_member_run_ids`; a version promoted
    before that tag keeps the row it had."""
    import dataclasses

    from tune_cells.analysis.model_card_text import CardFacts, _model

    seeds_only = {"ensemble_seeds": "7,107,207", "trial_run_id": "trialrun"}
    facts = CardFacts(task="lung", task_description="", model_name="m", version="3", version_tags=seeds_only,
                      evaluation_run_id="e", evaluation_time="t", metrics={}, evaluation_params={}, search_run_id="s",
                      search_name="n", search_params={}, search_metrics={}, search_seconds=None, data={},
                      space_yaml="", config={}, experiment_id="1")
    before = ("| Ensemble | the mean of 3 networks of this configuration, trained under seeds 7,107,207 "
              "(the first is the trial's) |")
    assert before in _model(facts).splitlines()

    def ensemble_row(member_run_ids: str) -> str:
        tags = seeds_only | {"ensemble_member_run_ids": member_run_ids}
        text = _model(dataclasses.replace(facts, version_tags=tags))
        return next(line for line in text.splitlines() if line.startswith("| Ensemble |"))

    assert ensemble_row("trialrun,retrain1,retrain2") == (
        before.removesuffix(" |") + "; their MLflow runs: seed 7 run `trialrun`, seed 107 run `retrain1`, "
        "seed 207 run `retrain2` |")
    assert ensemble_row("trialrun,,retrain2").endswith(  # promotion's '' for a member without a finished run
        "seed 7 run `trialrun`, seed 107 no finished run, seed 207 run `retrain2` |")
    assert ensemble_row("trialrun,retrain1") == before  # tags that disagree: no pairing guessed
    failed = {"ensemble_not_built": "ensemble: 2: the retrain under seed 107 failed: diverged at epoch 1"}
    assert ("| Ensemble | not built, so this is one network: ensemble: 2: the retrain under seed 107 failed: "
            "diverged at epoch 1 |") in _model(dataclasses.replace(facts, version_tags=failed)).splitlines()
    trials = {"ensemble_trials": "f2d8e533,9e526e80", "ensemble_member_run_ids": "runA,runB"}
    assert ("| Ensemble | the mean of 2 networks: the promoted trial and the search's next-best trials that trained "
            "every epoch: f2d8e533,9e526e80; their MLflow runs: trial f2d8e533 run `runA`, trial 9e526e80 run `runB` |"
            ) in _model(dataclasses.replace(facts, version_tags=trials)).splitlines()
