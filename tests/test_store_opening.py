"""The commands that open an existing MLflow store (card, report, promote, evaluate, export, predict,
explain, serve) refuse what is no store, or no longer the store it was, with one line and exit 2,
and leave it as it was: MLflow would add its tables to any sqlite file, retry an absent server for
minutes, and fail over several lines on a damaged file or a moved working folder."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from test_cluster_search import free_port

# Each command that opens an existing store, with what else it needs ({image}: an image file).
STORE_COMMANDS = [["card", "nuclei"], ["report"], ["promote", "nuclei", "1"], ["evaluate", "nuclei"],
                  ["export", "nuclei"], ["predict", "nuclei", "{image}"], ["explain", "nuclei", "{image}"],
                  ["serve", "nuclei", "--port", "{port}"]]


def one_line_refusals(run_cli, commands, *extra, image=None, code=2) -> set[str]:
    """The stderr of each command, which must exit `code` with one line; a set: one element when
    they all say the same."""
    lines = set()
    for args in commands:
        result = run_cli(*[a.format(image=image, port=free_port()) for a in args], *extra)
        assert result.code == code and len(result.err.strip().splitlines()) == 1, (args, result.err)
        lines.add(result.err.strip())
    return lines


def an_image(folder: Path) -> Path:
    Image.new("RGB", (8, 8)).save(folder / "cell.png")
    return folder / "cell.png"


def user_database(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("create table patients(id int)")
    connection.close()
    return path


@pytest.mark.parametrize("kind, said", [
    ("another database", "an SQLite database without MLflow's experiments and alembic_version tables"),
    ("an empty file", "an empty file"),
    ("garbage", "not an SQLite file: damaged, or another kind of file"),
    ("a folder", "a folder"),
])
def test_a_file_that_is_no_mlflow_store_is_refused_by_every_command_and_left_as_it_was(run_cli, tmp_path, kind, said):
    workdir = tmp_path / "work"
    workdir.mkdir()
    db = workdir / "mlflow.db"
    if kind == "another database":
        user_database(db)
    elif kind == "a folder":
        db.mkdir()
    else:
        db.write_bytes(b"" if kind == "an empty file" else b"garbage\n")
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    image = an_image(tmp_path)

    started = time.monotonic()
    said_by_all = one_line_refusals(run_cli, STORE_COMMANDS, "--workdir", workdir, image=image)
    assert said_by_all == {f"tune-cells: error: {db} is not an MLflow store ({said}): give the store a search "
                           "wrote (--workdir or --tracking-uri)"}
    assert time.monotonic() - started < 60  # (a folder was ~100 s of MLflow's retries per command)
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


def test_a_database_given_by_tracking_uri_gets_no_mlflow_tables(run_cli, tmp_path):
    other = user_database(tmp_path / "other.db")
    content = other.read_bytes()
    (said,) = one_line_refusals(run_cli, [["card", "nuclei"], ["report"]], "--tracking-uri", f"sqlite:///{other}",
                                "--workdir", tmp_path / "work")
    assert f"{other} is not an MLflow store (an SQLite database without MLflow's" in said
    assert other.read_bytes() == content and not (tmp_path / "work").exists()


def test_an_unreachable_server_is_one_line_at_once(run_cli, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # a closed port: MLflow alone retried for 400 s, or said "no champion"
    started = time.monotonic()
    said = one_line_refusals(run_cli, STORE_COMMANDS, "--tracking-uri", uri, "--workdir", tmp_path / "work",
                             image=an_image(tmp_path))
    assert said == {f"tune-cells: error: tracking server {uri} does not answer ([Errno 111] Connection refused)"}
    assert time.monotonic() - started < 30


def test_a_database_without_its_driver_is_named(run_cli, tmp_path):
    pytest.importorskip("sqlalchemy")
    try:
        import psycopg  # noqa: F401
        pytest.skip("psycopg is installed here")
    except ImportError:
        pass
    (said,) = one_line_refusals(run_cli, [["card", "nuclei"], ["report"], ["evaluate", "nuclei"]],
                                "--tracking-uri", "postgresql://me:s3cret@127.0.0.1:1/mlflow",
                                "--workdir", tmp_path / "work")
    assert said == ("tune-cells: error: --tracking-uri postgresql://me:***@127.0.0.1:1/mlflow: its database driver is "
                    "not installed (no module 'psycopg'; pip install 'psycopg[binary]')")
