"""Accuracy against cost: every finished trial's parameter count and latency per image, logged after
the search; the report's Pareto front; and `--max-latency-ms` as a step of the one promotion pipeline,
run again on a copy of the shared demo search's store."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import SEARCHED_SPACE

MODEL = "tune-cells-nuclei-demo"
slow = pytest.mark.slow


def trial_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`tune_cells.run_type` = 'trial'")


def search_run(client, experiment_id: str):
    return client.search_runs([experiment_id], "tags.`tune_cells.run_type` = 'search'")[0]


@slow
def test_finished_trials_carry_param_count_and_latency(searched):
    from tune_cells.models import create_model

    client, experiment = searched["client"], searched["experiment"]
    finished = [r for r in trial_runs(client, experiment.experiment_id) if r.info.status == "FINISHED"]
    assert len(finished) == 4  # ASHA-stopped trials finish too, with a checkpoint
    for run in finished:
        network = create_model("small_convnet", num_classes=4, in_channels=3, depth=2,
                               width=int(run.data.params["width"]), dropout=0.0)
        assert run.data.metrics["param_count"] == sum(p.numel() for p in network.parameters())
        assert 0 < run.data.metrics["latency_ms_per_image"] < 1000
        assert run.data.tags["latency_device"].startswith("cpu (") and "threads)" in run.data.tags["latency_device"]
        assert run.data.tags["latency_batch_size"] == "8"
    parent = search_run(client, experiment.experiment_id)
    assert "median of 20 batches" in parent.data.tags["latency_protocol"] and "on cpu (" in parent.data.tags["latency_protocol"]
    assert parent.data.tags["latency_budget_ms"] == "none"
    version = client.get_model_version(MODEL, parent.data.tags["model_version"])
    champion = next(r for r in finished if r.data.tags["ray_trial_id"] == version.tags["ray_trial_id"])
    assert int(version.tags["param_count"]) == champion.data.metrics["param_count"]
    views = 8 if version.tags["tta"] == "dihedral" else 1  # as it predicts: each test-time view is a pass
    assert float(version.tags["latency_ms_per_image"]) == pytest.approx(
        views * champion.data.metrics["latency_ms_per_image"], rel=1e-4)


@slow
def test_report_draws_the_pareto_front_and_lists_latency_and_parameters(searched, tmp_path, run_cli):
    from tune_cells.analysis.search_plots import non_dominated

    workdir = shutil.copytree(searched["workdir"], tmp_path / "work")
    result = run_cli("report", "--experiment", "tune-cells-nuclei-demo", "--workdir", workdir)
    assert result.code == 0, result.err[-2000:]
    folder = next((workdir / "reports").iterdir())
    with Image.open(folder / "pareto_front.png") as image:
        assert image.width >= 600 and image.height >= 300
    page = (folder / "report.html").read_text()
    assert 'src="pareto_front.png"' in page and "<th>latency_ms_per_image</th>" in page and "<th>param_count</th>" in page
    assert "<th>latency_device</th>" in page
    trials = pd.read_csv(folder / "trials.csv")
    assert trials["latency_ms_per_image"].gt(0).all() and trials["param_count"].gt(0).all()
    assert trials["latency_device"].str.startswith("cpu (").all()  # where the number was measured
    front = trials.loc[non_dominated(trials["latency_ms_per_image"], trials["best_value"], "max")]
    assert trials["best_value"].idxmax() in front.index  # the best is never dominated ...
    assert trials["latency_ms_per_image"].idxmin() in front.index  # ... nor the fastest
    for i in front.index:  # and no front point has another trial both faster and better
        others = trials.drop(i)
        assert not ((others["latency_ms_per_image"] < trials.loc[i, "latency_ms_per_image"])
                    & (others["best_value"] > trials.loc[i, "best_value"])).any()


def repromotion(searched, tmp_path):
    """The shared search's store copied, and what its promotion pipeline takes, rebuilt there: the
    preflight of the same options, the trials' data, Ray's results read back from the copy."""
    from tune_cells import ray_backend
    from tune_cells.data.reader import SplitReader
    from tune_cells.preflight import SearchOptions, check_inputs, check_pixels
    from tune_cells.tracking import Tracker

    workdir = shutil.copytree(searched["workdir"], tmp_path / "work")
    (tmp_path / "space.yaml").write_text(SEARCHED_SPACE)
    prep = check_inputs(SearchOptions(task="nuclei", samples=4, max_epochs=3, grace_period=1, reduction_factor=2,
                                      space=tmp_path / "space.yaml", workdir=workdir, seed=3))
    check_pixels(prep)
    task = prep.task
    reader = SplitReader(prep.index, prep.split, task.channels, prep.store_size.size, prep.workdir, prep.decoded)
    data = task.kind.trial_inputs(task, prep.index, reader, 3, 3).data
    tracker = Tracker(prep.tracking_uri, prep.workdir.artifacts)
    first = tracker.latest_search(prep.experiment)
    result = ray_backend.finished_search(str(prep.workdir.ray_storage(prep.experiment) / first.data.tags["ray_experiment"]),
                                         task.metric, task.mode)
    runs = tracker.trial_runs(first.info.experiment_id, first.info.run_id)
    again = tracker.start_run(first.info.experiment_id, "again", "search", tags={"split_sha256": prep.split.sha256})
    return tracker, prep, data, result, runs, first, again


@slow
def test_a_latency_budget_promotes_the_best_trial_that_fits(searched, tmp_path):
    from tune_cells.analysis.promotion import promote

    tracker, prep, data, result, runs, first, again = repromotion(searched, tmp_path)
    champion_trial = first.data.tags["best_trial_overall"]  # the best by validation (the one-SE rule may have promoted a recipe)
    latency = {trial: tracker.get_run(run).data.metrics["latency_ms_per_image"] for trial, run in runs.items()}
    # Four tiny networks of one architecture on a shared CPU: their measured order is noise. The
    # champion is recorded as the slowest (in the copy only), as test_interrupts records a weaker
    # score, so that a budget below it and above the others exists every time.
    slowest = 2 * max(latency.values())
    tracker.log_metrics(runs[champion_trial], {"latency_ms_per_image": slowest})
    tracker.set_version_tags(MODEL, "1", {"latency_ms_per_image": slowest})
    budget = (max(v for t, v in latency.items() if t != champion_trial) + slowest) / 2
    expected = max((t for t in result.trials if t.trial_id != champion_trial), key=lambda t: t.best_metric)

    outcome = promote(tracker, again, prep, prep.split, result, runs, 3, data, max_latency_ms=budget)

    assert outcome.best_trial_id == expected.trial_id != champion_trial
    assert outcome.best_metric == pytest.approx(expected.best_metric)
    assert f"within --max-latency-ms {budget:g}" in outcome.latency_note and champion_trial in outcome.latency_note
    version = tracker.client.get_model_version(MODEL, outcome.model_version)
    assert version.tags["ray_trial_id"] == expected.trial_id and version.tags["search_run_id"] == again
    assert float(version.tags["latency_ms_per_image"]) <= budget  # as it predicts, test-time views included
    assert version.tags["latency_budget_ms"] == f"{budget:g}"
    assert outcome.decision.champion and "over the latency budget" in outcome.decision.reason
    assert str(tracker.version_for_alias(MODEL, "champion").version) == outcome.model_version
    assert str(tracker.version_for_alias(MODEL, "previous-champion").version) == "1"
    parent = tracker.get_run(again)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"] == expected.trial_id
    assert parent.data.tags["best_trial_overall"] == champion_trial


@slow
def test_a_budget_no_trial_fits_promotes_nothing_and_names_the_fastest(searched, tmp_path):
    from tune_cells.analysis.promotion import promote
    from tune_cells.errors import UserInputError

    tracker, prep, data, result, runs, first, again = repromotion(searched, tmp_path)
    latency = {trial: tracker.get_run(run).data.metrics["latency_ms_per_image"] for trial, run in runs.items()}
    fastest = min(latency, key=latency.get)
    with pytest.raises(UserInputError) as raised:  # the CLI's exit 2, its message one line
        promote(tracker, again, prep, prep.split, result, runs, 3, data, max_latency_ms=latency[fastest] / 2)
    message = str(raised.value)
    assert "\n" not in message and "no trial fits" in message and "nothing promoted" in message
    assert f"trial {fastest}, takes {latency[fastest]:.3g} ms per image" in message
    assert str(tracker.version_for_alias(MODEL, "champion").version) == "1"
    assert len(tracker.client.search_model_versions(f"name='{MODEL}'")) == 1
    assert tracker.version_of_search(MODEL, again) is None
    assert sorted(tracker.trial_runs(first.info.experiment_id, first.info.run_id)) == sorted(runs)  # all kept


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_max_latency_ms_must_be_above_zero(run_cli, tmp_path, value):
    result = run_cli("search", "nuclei", "--max-latency-ms", value, "--workdir", tmp_path / "w")
    assert result.code == 2 and f"--max-latency-ms {value}" in result.err and "above 0" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_latency_is_measured_where_predict_and_serve_run_the_model_even_beside_cuda(monkeypatch):
    import inspect

    import torch

    from tune_cells.analysis.latency import prediction_device
    from tune_cells.kinds import PREDICTION_DEVICE, load_predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: trials may train there
    assert prediction_device() == torch.device("cpu")
    assert inspect.signature(load_predictor).parameters["device"].default == PREDICTION_DEVICE == "cpu"
