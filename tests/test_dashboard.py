"""The live view: each trial mirrored into an Optuna journal as it reports, and `tune-cells dashboard`
(optuna-dashboard) over it, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest

from conftest import chromium, cli_subprocess, free_port, stop_process_group


def load(path, name):
    from tune_cells.live_study import open_journal

    return optuna.load_study(study_name=name, storage=open_journal(path))


def test_dashboard_without_a_journal_is_bad_input(run_cli, tmp_path):
    result = run_cli("dashboard", "--workdir", tmp_path / "nothing-here")
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert "no Optuna journal at" in result.err and "tune-cells search TASK" in result.err
    assert not (tmp_path / "nothing-here").exists()
    (tmp_path / "optuna-journal.log").write_text("not a journal\n")
    result = run_cli("dashboard", "--workdir", tmp_path)
    assert result.code == 2 and "holds no Optuna study" in result.err
    from tune_cells.live_study import open_journal

    (tmp_path / "optuna-journal.log").unlink()
    optuna.create_study(study_name="search-1", storage=open_journal(tmp_path / "optuna-journal.log"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("dashboard", "--workdir", tmp_path, "--port", taken.getsockname()[1])
    assert result.code == 2 and result.err.count("\n") == 1 and "cannot listen there" in result.err, result.err


def write_journal(workdir):
    """A journal of one study with three finished trials, as a search leaves it."""
    from tune_cells.live_study import open_journal

    study = optuna.create_study(study_name="search-1", storage=open_journal(workdir / "optuna-journal.log"))
    for value in (0.5, 0.6, 0.7):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    return workdir / "optuna-journal.log"


def test_a_damaged_journal_is_one_line_naming_the_file_and_line(tmp_path):
    """Optuna fails on an unreadable line followed by others (a write cut short, then more
    written) with a bare JSON or UTF-8 error; a line cut short at the end is one being written.
    (A subprocess with a timeout: a dashboard that opened the journal would serve until stopped.)"""
    journal = write_journal(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    for damaged, why in ((lines[0] + lines[1][:20] + b"".join(lines[1:]), "line 2 is no journal entry"),
                         (lines[0] + b"\x93\xff\xfe random\n" + b"".join(lines[1:]), "line 2 is not text")):
        journal.write_bytes(damaged)
        result = cli_subprocess(["dashboard", "--workdir", tmp_path, "--port", free_port()], tmp_path, timeout=60)
        assert result.code == 2 and result.err.count("\n") == 1, result.err
        assert f"{journal}: {why}" in result.err and "the journal is damaged" in result.err, result.err
        assert journal.read_bytes() == damaged  # the user's file as it was
    from tune_cells.live_study import open_journal

    journal.write_bytes(b"".join(lines) + lines[-1][:30])  # a search is writing its next entry
    (study,) = open_journal(journal).get_all_studies()
    assert study.study_name == "search-1" and len(optuna.load_study(study_name="search-1", storage=open_journal(
        journal)).trials) == 3


def test_banner_addresses_are_urls():
    from tune_cells.listening import base_url

    assert base_url("::1", 8080) == "http://[::1]:8080" and base_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    for every_interface in ("", "0.0.0.0", "::"):  # the dashboard's Host check refused http://0.0.0.0:8080
        assert base_url(every_interface, 8080) == "http://127.0.0.1:8080"


def test_the_host_check_compares_names_as_a_host_header_means_them():
    """--allowed-host ::1 never matched the header [::1]:8080; MyHost. is the name MyHost."""
    from tune_cells.commands.dashboard import ReadOnly
    from tune_cells.serving import answered_hosts

    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"ok"]

    def status(host: str) -> str:
        answered = []
        view(dict(HTTP_HOST=host, REQUEST_METHOD="GET"), lambda status, headers: answered.append(status))
        return answered[0][:3]

    view = ReadOnly(app, answered_hosts("0.0.0.0", ("fd00::5", "MyHost", "cells.lab.")))
    for host in ("[fd00::5]:8080", "[FD00::0:5]", "MyHost:8080", "myhost.", "cells.lab", "CELLS.LAB.:80", "localhost"):
        assert status(host) == "200", host
    for host in ("evil.example", "fd00::5", "[fd00::6]", "myhost.evil", "0.0.0.0:8080", "", "cells.lab/x"):
        assert status(host) == "400", host


def request(port, path, method="GET", host=None):
    """(status, body) of one request with its own Host header; never raises for an HTTP error."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.slow
def test_dashboard_answers_beside_an_idle_connection_and_changes_nothing(tmp_path):
    """A browser's preconnect (a socket that sends nothing, or half a request) stalled wsgiref's one
    thread for everyone; a DNS-rebinding page could delete a study through optuna-dashboard's API."""
    journal = write_journal(tmp_path)
    before = journal.read_bytes()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tune_cells", "dashboard", "--workdir", tmp_path, "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        assert server.stdout.readline().startswith(f"Optuna dashboard on http://127.0.0.1:{port} for {journal}")
        deadline = time.monotonic() + 60
        while True:
            try:
                idle, half = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "optuna-dashboard did not start"
                time.sleep(0.2)
        with idle, half:
            half.sendall(b"GET / HTTP/1.1\r\n")
            status, body = request(port, "/api/studies")  # within 5 s, while both stay open
            assert status == 200 and json.loads(body)["study_summaries"][0]["study_name"] == "search-1"
            assert request(port, "/dashboard/", host=f"localhost:{port}")[0] == 200
            assert request(port, "/api/studies", host="evil.example")[0] == 400
            assert request(port, "/api/studies/0", "DELETE", host="evil.example")[0] == 400
            status, body = request(port, "/api/studies/0", "DELETE")
            assert status == 405 and b"read-only" in body
            for method, path in (("POST", "/api/studies/0/rename"), ("PUT", "/api/studies/0/note")):
                assert request(port, path, method)[0] == 405
        assert journal.read_bytes() == before
    finally:
        stop_process_group(server)


def test_journal_follows_a_trial_from_start_to_end_and_across_a_resume(tmp_path):
    """The mirror itself, fed the events Ray's driver callback forwards, on a real journal file."""
    from optuna.distributions import FloatDistribution

    from tune_cells.live_study import StudyJournal
    from tune_cells.search_spaces import SearchSpace

    space = SearchSpace({"model": "small_convnet", "lr": {"float": [1e-3, 1e-2], "log": True}}, "/x/mine.yaml")
    warm = optuna.trial.create_trial(value=0.5, params={"lr": 2e-3},
                                     distributions={"lr": FloatDistribution(1e-3, 1e-2, log=True)})
    path = tmp_path / "work" / "optuna-journal.log"

    def journal():
        return StudyJournal(path, "search-1", space, "val_acc", "max", 3, {"task": "nuclei"}, [warm],
                            {"a": "run-a"}.get)

    first = journal()
    first.open()
    config = {"model": "small_convnet", "lr": 4e-3}
    for trial in ("a", "b", "c"):
        first.on_trial_start(trial, f"train_{trial}", config if trial != "c" else {**config, "lr": 1e-7})
    for epoch, value in ((1, 0.6), (2, 0.7), (3, 0.8)):
        first.on_trial_result("a", {"val_acc": value, "training_iteration": epoch})
    first.on_trial_end("a", False, {"val_acc": 0.8, "training_iteration": 3}, None)
    first.on_trial_result("b", {"val_acc": 0.3, "training_iteration": 1})
    first.on_trial_end("b", False, {"val_acc": 0.3, "training_iteration": 1}, None)  # ASHA stopped it
    first.on_trial_result("c", {"val_acc": 0.2, "training_iteration": 1})
    # interrupted here; --resume opens the same study again and continues trial c
    again = journal()
    again.open()
    again.on_trial_start("c", "train_c", config)
    again.on_trial_result("c", {"val_acc": math.nan, "training_iteration": 2})
    again.on_trial_end("c", True, {"val_acc": math.nan, "training_iteration": 2}, "RuntimeError: boom")
    study = load(path, "search-1")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[0].value == 0.5 and study.user_attrs["task"] == "nuclei" and study.metric_names == ["val_acc"]
    a, b, c = study.trials[1:]
    assert a.value == 0.8 and a.intermediate_values == {1: 0.6, 2: 0.7, 3: 0.8} and a.params == {"lr": 4e-3}
    assert a.user_attrs == {"ray_trial_id": "a", "ray_trial": "train_a", "mlflow_run_id": "run-a"}
    assert b.value == 0.3 and b.intermediate_values == {1: 0.3}
    assert c.params == {"lr": 1e-7}  # an initial point outside the range, kept as Ray's study keeps it
    assert c.intermediate_values == {1: 0.2} and c.user_attrs["failure"] == "RuntimeError: boom"


@pytest.mark.parametrize("cut", [b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par', b"x" * 70_000])
def test_a_resumed_search_drops_an_entry_its_killed_run_left_unfinished(tmp_path, caplog, cut):
    """A search killed mid-write leaves its last entry cut short; the resumed search appended straight
    after it, and the journal was then unreadable (the dashboard: 'line N is no journal entry')."""
    from tune_cells.live_study import StudyJournal, open_journal
    from tune_cells.search_spaces import SearchSpace

    path = tmp_path / "optuna-journal.log"
    space = SearchSpace({"lr": {"float": [1e-3, 1e-2]}}, "x.yaml")
    first = StudyJournal(path, "s", space, "val_acc", "max", 3)
    first.open()
    first.on_trial_start("a", "train_a", {"lr": 2e-3})
    whole = path.read_bytes()
    with path.open("ab") as journal:
        journal.write(cut)  # killed here (a cut line longer than one read block too)
    again = StudyJournal(path, "s", space, "val_acc", "max", 3)
    again.open()
    again.on_trial_result("a", {"val_acc": 0.5, "training_iteration": 1})
    again.on_trial_end("a", False, {"val_acc": 0.5, "training_iteration": 1}, None)
    assert path.read_bytes().startswith(whole) and cut not in path.read_bytes()
    (trial,) = optuna.load_study(study_name="s", storage=open_journal(path)).trials
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {1: 0.5}  # ended before its 3 epochs
    assert f"dropped an unfinished last entry ({len(cut)} bytes)" in caplog.text


def test_a_journal_that_cannot_be_written_does_not_stop_the_search(tmp_path, caplog):
    from tune_cells.live_study import StudyJournal
    from tune_cells.search_spaces import SearchSpace

    (tmp_path / "file").write_text("")
    journal = StudyJournal(tmp_path / "file" / "optuna-journal.log", "s", SearchSpace({"lr": 0.1}, "x.yaml"),
                           "val_acc", "max", 3)
    journal.open()
    journal.on_trial_start("a", "train_a", {"lr": 0.1})
    journal.on_trial_result("a", {"val_acc": 0.5, "training_iteration": 1})
    journal.on_trial_end("a", False, {"val_acc": 0.5, "training_iteration": 3}, None)
    assert [r.message for r in caplog.records if "live view" in r.message][0].startswith("live view: cannot write")


def search_run(searched):
    client = searched["client"]
    (run,) = client.search_runs([searched["experiment"].experiment_id], "tags.`tune_cells.run_type` = 'search'")
    return run


@pytest.mark.slow
def test_the_search_mirrored_every_trial_and_epoch(searched):
    client, parent = searched["client"], search_run(searched)
    study = load(searched["workdir"] / "optuna-journal.log", parent.info.run_name)
    assert study.user_attrs["mlflow_run_id"] == parent.info.run_id and len(study.trials) == 4
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_balanced_accuracy")}
        assert trial.intermediate_values == history  # every epoch: the learning curve
        assert trial.state.name == ("PRUNED" if run.data.tags.get("stopped_early") else "COMPLETE")
        assert trial.value == run.data.metrics["val_balanced_accuracy"]
        assert {k: str(v) for k, v in trial.params.items()} == {k: run.data.params[k] for k in trial.params}
    assert any(t.state.name == "PRUNED" for t in study.trials)  # the lr 1e-7 trial


def text_of(dom: str) -> str:
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
def test_dashboard_renders_the_search_in_chromium(searched, tmp_path):
    browser = chromium()
    parent = search_run(searched)
    workdir = tmp_path / "work"  # the dashboard reads a copy: the fixture stays as the search left it
    workdir.mkdir()
    shutil.copy(searched["workdir"] / "optuna-journal.log", workdir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tune_cells", "dashboard", "--workdir", workdir, "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "optuna-dashboard did not start"
                time.sleep(0.5)
        (summary,) = [s for s in studies if s["study_name"] == parent.info.run_name]
        pages = {}
        for page in ("", "/trials"):
            url = f"http://127.0.0.1:{port}/dashboard/studies/{summary['study_id']}{page}"
            pages[page] = text_of(subprocess.run(
                [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--virtual-time-budget=20000", "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout)
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=20000", "--window-size=1400,1000", f"--screenshot={tmp_path / 'study.png'}",
                        f"http://127.0.0.1:{port}/dashboard/studies/{summary['study_id']}"], capture_output=True,
                       timeout=120)
        overview, trials = pages[""], pages["/trials"]
        assert parent.info.run_name in overview and "History" in overview, overview[:2000]
        assert "Intermediate values" in overview and "val_balanced_accuracy" in overview  # learning curves, named
        assert "4 Trials" in trials and all(f"Trial {n}" in trials for n in range(4)), trials[:2000]
        assert "Pruned" in trials and "Complete" in trials
        assert (tmp_path / "study.png").stat().st_size > 20_000
    finally:
        stop_process_group(server)
