"""One writer per working folder: a second `search` or `evaluate` is refused at once, naming the
holder; the lock leaves nothing behind and dies with its holder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tune_cells.lock import WorkdirLock
from tune_cells.paths import WorkDir

from conftest import write_kaggle


def test_a_second_writer_is_refused_naming_the_holder(run_cli, tmp_path):
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 6)
    workdir = WorkDir.at(tmp_path / "work")
    with WorkdirLock(workdir, "search"):
        search = run_cli("search", "nuclei", "--data", data, "--workdir", workdir.root)
        evaluate = run_cli("evaluate", "nuclei", "--workdir", workdir.root)
    for result in (search, evaluate):
        lines = result.err.strip().splitlines()
        assert result.code == 2 and len(lines) == 1, result.err
        assert "is in use by another tune-cells command (pid " in lines[0] and "tune-cells search" in lines[0]
    assert not workdir.root.exists()  # the lock made the folder and took it away again


def test_read_only_commands_take_no_lock(run_cli, tmp_path):
    workdir = WorkDir.at(tmp_path / "work")
    with WorkdirLock(workdir, "search"):
        result = run_cli("report", "--workdir", workdir.root)
    assert "in use" not in result.err


def test_the_lock_dies_with_its_holder(tmp_path):
    workdir = WorkDir.at(tmp_path / "work")
    workdir.root.mkdir()
    (workdir.root / "notes.txt").write_text("the user's")
    code = ("import sys, time\nfrom tune_cells.lock import WorkdirLock\nfrom tune_cells.paths import WorkDir\n"
            f"lock = WorkdirLock(WorkDir.at({str(workdir.root)!r}), 'search').__enter__()\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    with WorkdirLock(workdir, "evaluate"):  # a kill -9 leaves no stale lock
        assert "tune-cells evaluate" in workdir.lock.read_text()
    assert not workdir.lock.exists() and (workdir.root / "notes.txt").exists()
