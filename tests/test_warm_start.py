"""`search --warm-start`: a second real search of the `searched` fixture's task and space (on a copy of
its workdir) starts from the first one's finished trials. Checked in the study Ray's Optuna searcher
saved, in the live journal and in MLflow."""

from __future__ import annotations

import re
import shutil
import sqlite3

import pytest

from conftest import cli_subprocess, store_client

pytestmark = pytest.mark.slow

EXPERIMENT = "tune-cells-nuclei-demo"
LR_RANGE = (1.0e-3, 5.0e-3)  # the fixture's space: its second initial point (lr 1e-7) lies outside


def copy_workdir(source, destination):
    """A workdir copy whose MLflow store points at its own artifact folder (the store keeps absolute
    locations: a search in the copy would otherwise write into the original's)."""
    shutil.copytree(source, destination)
    old, new = str(source), str(destination)
    with sqlite3.connect(destination / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = REPLACE("{column[1]}", ?, ?) '
                               f'WHERE instr("{column[1]}", ?) > 0', (old, new, old))
    return destination


@pytest.fixture(scope="module")
def warm(searched, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    workdir = copy_workdir(searched["workdir"], root / "work")
    result = cli_subprocess(["search", "nuclei", "--warm-start", "--samples", 2, "--max-epochs", 2, "--grace-period", 1,
                             "--reduction-factor", 2, "--max-concurrent", 1, "--space", searched["root"] / "space.yaml",
                             "--workdir", workdir, "--seed", 3, "--no-evaluate"], cwd=root)
    assert result.code == 0, result.err[-3000:]
    client = store_client(workdir / "mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    first, second = client.search_runs([experiment], "tags.`tune_cells.run_type` = 'search'",
                                       order_by=["attributes.start_time ASC"])
    def trials(parent):
        return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                  "tags.`tune_cells.run_type` = 'trial'",
                                  order_by=["attributes.start_time ASC"])
    return {"root": root, "workdir": workdir, "result": result, "client": client, "first": first, "second": second,
            "earlier": trials(first), "new": trials(second)}


def expected_given(warm) -> list:
    """The first search's trials that --warm-start gives: finished, scored, inside the space."""
    return [run for run in warm["earlier"] if run.info.status == "FINISHED"
            and LR_RANGE[0] <= float(run.data.params["lr"]) <= LR_RANGE[1]]


def test_the_log_says_what_was_given(warm):
    given = expected_given(warm)
    assert len(given) >= 2 and len(given) < len(warm["earlier"])  # some given, the lr 1e-7 one skipped
    best = max(run.data.metrics["val_balanced_accuracy"] for run in given)
    line = re.search(r"warm start: (\d+) earlier trials of nuclei \(space\) given to the sampler, best "
                     r"val_balanced_accuracy ([\d.]+)", warm["result"].err)
    assert line, warm["result"].err[-3000:]
    assert int(line[1]) == len(given) and line[2] == f"{best:.4f}"
    skipped = len(warm["earlier"]) - len(given)
    assert f"warm start: {skipped} finished trial(s) of earlier searches of nuclei (space) outside the space" in \
        warm["result"].err
    assert warm["second"].data.tags["warm_start_trials"] == str(len(given))


def test_the_new_study_holds_the_earlier_trials_before_its_first(warm):
    from tune_cells import ray_searcher
    from tune_cells.warm_start import WARM_ATTR

    given = expected_given(warm)
    name = warm["second"].data.tags["ray_experiment"]
    study = ray_searcher.searcher_study(str(warm["workdir"] / "ray" / EXPERIMENT / name))  # the searcher's own study
    assert study is not None and len(study.trials) == len(given) + 2
    head, tail = study.trials[:len(given)], study.trials[len(given):]
    for trial, run in zip(head, given):
        assert trial.state.name == "COMPLETE" and trial.value == run.data.metrics["val_balanced_accuracy"]
        assert trial.user_attrs[WARM_ATTR] == warm["first"].info.run_name
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert {k: str(v) for k, v in trial.params.items()} == {k: run.data.params[k] for k in ("width", "dropout", "lr")}
    assert all(WARM_ATTR not in trial.user_attrs for trial in tail)
    assert max(t.datetime_start for t in head) <= min(t.datetime_start for t in tail)
    assert warm["second"].data.metrics["searcher_trials"] == 2  # Ray's trials only


def test_no_earlier_configuration_is_tried_again(warm):
    earlier = [{k: run.data.params[k] for k in ("width", "dropout", "lr")} for run in warm["earlier"]]
    new = [{k: run.data.params[k] for k in ("width", "dropout", "lr")} for run in warm["new"]]
    assert len(new) == 2
    assert not any(config in earlier for config in new)  # not the initial points, not the same seed's draws


def test_the_journal_shows_the_given_trials_first(warm):
    import optuna

    from tune_cells.live_study import open_journal

    given = expected_given(warm)
    study = optuna.load_study(study_name=warm["second"].info.run_name,
                              storage=open_journal(warm["workdir"] / "optuna-journal.log"))
    assert [t.value for t in study.trials[:len(given)]] == [r.data.metrics["val_balanced_accuracy"] for r in given]
    assert [t.user_attrs["mlflow_run_id"] for t in study.trials[len(given):]] == [r.info.run_id for r in warm["new"]]
    assert all(t.intermediate_values for t in study.trials[len(given):])
