"""Bad input: one line on stderr naming the culprit, exit 2, and nothing written."""

import subprocess
import sys

import pytest
from PIL import Image

from tune_cells.errors import UserInputError

from conftest import FORMAT1_MODEL, register_model_folder, store_client, write_kaggle


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "mitochondria"], "unknown task 'mitochondria'"),
        (["search", "nuclei", "--samples", "0"], "--samples 0: must be at least 1"),
        (["search", "nuclei", "--samples", "-3"], "--samples -3: must be at least 1"),
        (["search", "nuclei", "--max-epochs", "0"], "--max-epochs 0"),
        (["search", "nuclei", "--reduction-factor", "1"], "--reduction-factor 1"),
        (["search", "nuclei", "--cpus-per-trial", "0"], "--cpus-per-trial 0"),
        (["search", "nuclei", "--gpus-per-trial", "-1"], "--gpus-per-trial -1"),
        (["search", "nuclei", "--time-budget", "0"], "--time-budget 0: must be a number of minutes above 0"),
        (["search", "nuclei", "--time-budget", "nan"], "--time-budget nan: must be a number of minutes above 0"),
        (["search", "nuclei", "--samples", "many"], "'many' is not a valid integer"),
        (["search", "nuclei", "--data", "{tmp}/absent"], "absent: no such folder"),
        # before the space is read and its weights are looked for (seconds): a mistyped --data is said at once
        (["search", "nuclei", "--data", "{tmp}/absent", "--space", "{tmp}/absent.yaml"], "absent: no such folder"),
        (["search", "folder", "--data", "{tmp}"], "work is inside --data"),  # the next run would read the store
        (["search", "nuclei", "--space", "{tmp}/absent.yaml"], "absent.yaml: no such file"),
        (["search", "nuclei", "--bogus-flag"], "No such option '--bogus-flag'"),
        (["evaluate", "nuclei"], "no MLflow store at sqlite:///"),
        (["evaluate", "nuclei", "--model-uri", "runs:/abc/model"], "expected models:/NAME@ALIAS"),
        (["evaluate", "nuclei", "--seeds", "100000"], "--seeds 100000: must be 2 (a spread needs two retrains) to 50"),
        (["evaluate", "nuclei", "--bootstrap", "1000000000"], "--bootstrap 1000000000: must be 1 to 100000"),
        (["ui"], "no MLflow store at sqlite:///"),
        (["export", "nuclei"], "no MLflow store at sqlite:///"),
        (["export", "nuclei", "--model-uri", "models:/tune-cells-nuclei/1"], "no MLflow store at sqlite:///"),
        (["export", "nuclei", "--format", "tflite"], "Invalid value for '--format'"),
        (["serve", "nuclei", "--allowed-host", "cells.lab:5001"], "--allowed-host 'cells.lab:5001': not a host name"),
        (["serve", "nuclei", "--allowed-host", ""], "--allowed-host '': not a host name or IP address"),
        (["dashboard", "--allowed-host", "http://cells.lab/"], "--allowed-host 'http://cells.lab/': not a host"),
        (["dashboard", "--allowed-host", "my host"], "--allowed-host 'my host': not a host name or IP address"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_touch_nothing(run_cli, tmp_path, args, message):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("user file")
    before = snapshot(workdir)
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], "--workdir", workdir)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-cells: error:"), result.err
    assert message in lines[0]
    assert "Traceback" not in result.err
    assert snapshot(workdir) == before


def test_bad_dataset_exits_2_and_writes_nothing(run_cli, tmp_path):
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8)
    (data / "train" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    workdir = tmp_path / "work"
    result = run_cli("search", "nuclei", "--data", data, "--workdir", workdir)
    assert result.code == 2
    assert "cannot decode train/2.png" in result.err
    assert not workdir.exists()  # no split file, no read log, no MLflow store


@pytest.mark.parametrize("case", ["image", "class folder", "predicted file", "workdir", "experiment"])
def test_a_name_that_is_not_utf8_is_one_line_naming_it_and_nothing_is_written(run_cli, tmp_path, case):
    """Latin-1 bytes in a name (an old share, an archive): refused up front, not an encoder's error
    deep in pandas, MLflow or matplotlib (exit 1)."""
    import os

    root = os.fsencode(tmp_path)
    for label in (b"a", b"b"):
        os.makedirs(root + b"/data/" + label)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(os.fsdecode(root + b"/data/" + label + b"/%d.png" % i))
    bad = {"image": b"/data/a/caf\xe9.png", "class folder": b"/data/caf\xe9/0.png",
           "predicted file": b"/data/a/caf\xe9.png", "workdir": b"/data/a/0.png",
           "experiment": b"/data/a/0.png"}[case]
    os.makedirs(os.path.dirname(root + bad), exist_ok=True)
    Image.new("RGB", (16, 16)).save(os.fsdecode(root + bad))
    workdir = os.fsdecode(root + (b"/w\xe9" if case == "workdir" else b"/w"))
    if case == "predicted file":
        result = run_cli("predict", "nuclei", os.fsdecode(root + bad), "--workdir", workdir)
    else:  # an --experiment of such bytes reaches MLflow, which wraps the encoder's error
        more = ["--experiment", os.fsdecode(b"caf\xe9")] if case == "experiment" else []
        result = run_cli("search", "folder", "--data", tmp_path / "data", "--workdir", workdir, *more)
    assert result.code == 2, result.err
    (line,) = result.err.strip().splitlines()
    shown = "w\\xe9" if case == "workdir" else "caf\\xe9"
    assert line.startswith("tune-cells: error: ") and shown in line and "not UTF-8 text" in line, line
    assert not os.path.exists(workdir)


def test_unreachable_tracking_server_exits_2_before_any_write(run_cli, tmp_path):
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8)
    workdir = tmp_path / "work"
    result = run_cli("search", "nuclei", "--data", data, "--workdir", workdir,
                     "--tracking-uri", "http://127.0.0.1:9")
    assert result.code == 2
    assert "tracking server http://127.0.0.1:9 does not answer" in result.err
    assert not workdir.exists()


def test_space_with_syntax_error_exits_2(run_cli, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  lr: {float: [0.1, 1]\n")
    result = run_cli("search", "nuclei", "--space", space, "--workdir", tmp_path / "w")
    assert result.code == 2 and "YAML syntax error at line" in result.err


def test_unwritable_workdir_exits_2(run_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder under a regular file cannot be made, not even by root
    result = run_cli("search", "nuclei", "--workdir", blocker / "sub")
    assert result.code == 2 and "not writable" in result.err


def test_tasks_lists_nuclei(run_cli):
    result = run_cli("tasks")
    assert result.code == 0 and "nuclei:" in result.out and "train.csv" in result.out


def test_report_of_an_unknown_run_id_is_one_line_exit_2(run_cli, tmp_path, capsys):
    from conftest import store_client

    (tmp_path / "w").mkdir()
    store_client(tmp_path / "w" / "mlflow.db").create_experiment("something")
    capsys.readouterr()  # MLflow's own log of creating the store (first in a process) is not the command's
    result = run_cli("report", "--run-id", "0123456789abcdef", "--workdir", tmp_path / "w")
    assert result.code == 2 and "--run-id 0123456789abcdef: no such run" in result.err
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--storage", "somewhere"), ("--address", "auto"), ("--cpus-per-trial", "3"),
                                         ("--gpus-per-trial", "0.5")])
def test_evaluate_placement_without_seeds_is_refused(run_cli, tmp_path, flag, value):
    result = run_cli("evaluate", "nuclei", flag, value, "--workdir", tmp_path / "w")
    assert result.code == 2 and f"{flag} is for the retrains of --seeds: give --seeds K too" in result.err


def test_serve_on_a_port_it_cannot_have_is_one_line_before_the_model_loads(run_cli, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["serve", "nuclei"], ["ui"]):  # before the model or the store is read
            result = run_cli(*command, "--port", port, "--workdir", tmp_path / "w")
            assert result.code == 2 and f"--host 127.0.0.1 --port {port}: cannot listen there" in result.err, result.err
            assert len(result.err.strip().splitlines()) == 1
    for command in ("serve", "dashboard", "ui"):
        result = run_cli(command, *(["nuclei"] if command == "serve" else []), "--port", 70000,
                         "--workdir", tmp_path / "w")
        assert result.code == 2 and "70000 is not in the range" in result.err, (command, result.err)


def test_card_never_replaces_a_file(run_cli, tmp_path):
    mine = tmp_path / "card.md"
    mine.write_text("mine\n")
    result = run_cli("card", "nuclei", "--output", mine, "--workdir", tmp_path / "w")
    assert result.code == 2 and f"--output {mine}: already exists (not overwritten)" in result.err
    assert mine.read_text() == "mine\n"


def test_an_output_file_given_as_a_folder_with_a_trailing_slash_is_refused(run_cli, tmp_path, capsys):
    """`export --output exports/new/` wrote files named `new` and `new.json` (a Path drops the '/'),
    and card and predict wrote a file `new` the same way: an output file, not a folder, is named."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    register_model_folder(workdir, FORMAT1_MODEL, alias="champion")
    capsys.readouterr()  # (MLflow's lines on making the store)
    for command in (["card", "nuclei"], ["export", "nuclei"], ["predict", "nuclei", an_image(tmp_path)]):
        for given in (f"{tmp_path}/out/new/", f"{tmp_path}/"):
            result = run_cli(*command, "--output", given, "--workdir", workdir)
            assert result.code == 2 and result.err.strip().splitlines() == [
                f"tune-cells: error: --output {given}: ends in '/', so it names a folder; name a file in it (folders "
                "it needs are made)"], (command, result.err)
    assert not (tmp_path / "out").exists()

def test_report_refuses_a_folder_of_other_files_and_leaves_it_alone(run_cli, tmp_path):
    """A report writes trials.csv and figures by fixed names: never among a user's files."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "trials.csv").write_text("mine\n")
    result = run_cli("report", "--output", folder, "--workdir", tmp_path / "w")
    assert result.code == 2 and f"--output {folder}: holds other files and no report" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert (folder / "trials.csv").read_text() == "mine\n" and not (tmp_path / "w").exists()
    result = run_cli("report", "--output", folder / "trials.csv" / "sub", "--workdir", tmp_path / "w")
    assert result.code == 2 and f"{folder / 'trials.csv'} is not a folder" in result.err, result.err
    assert not (tmp_path / "w").exists()


# Every command that opens a registered model, with what else it needs ({image}: an image file).
MODEL_COMMANDS = [["evaluate", "nuclei"], ["predict", "nuclei", "{image}"], ["explain", "nuclei", "{image}"],
                  ["export", "nuclei"], ["serve", "nuclei"], ["card", "nuclei"]]


def refusals(run_cli, commands, workdir, image, *extra) -> set[str]:
    """The stderr of each command (each must exit 2 with one line), as a set: one element when
    they all say the same."""
    lines = set()
    for args in commands:
        result = run_cli(*[str(a).format(image=image) for a in args], *extra, "--workdir", workdir)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, (args, result.err)
        lines.add(result.err.strip())
    return lines


def an_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cell.png")
    return tmp_path / "cell.png"


def test_a_missing_store_or_workdir_is_the_same_line_from_every_model_command(run_cli, tmp_path):
    image, workdir = an_image(tmp_path), tmp_path.resolve() / "work"  # absent: said as a missing store
    said = refusals(run_cli, [*MODEL_COMMANDS, ["promote", "nuclei", "1"]], workdir, image)
    assert said == {f"tune-cells: error: no MLflow store at sqlite:///{workdir}/mlflow.db: run `tune-cells search "
                    f"nuclei --workdir {workdir}` first, or give the --workdir that search used"}
    assert not workdir.exists()  # nothing created, not even by evaluate's and promote's lock
    store = tmp_path / "elsewhere.db"
    said = refusals(run_cli, MODEL_COMMANDS[:1], workdir, image, "--tracking-uri", f"sqlite:///{store}")
    assert said == {f"tune-cells: error: no MLflow store at sqlite:///{store}: run `tune-cells search nuclei "
                    f"--tracking-uri sqlite:///{store}` first, or give the --tracking-uri that search used"}


def test_no_champion_and_a_bad_model_are_the_same_line_from_every_model_command(run_cli, tmp_path, capsys):
    image, workdir = an_image(tmp_path), tmp_path.resolve() / "work"
    workdir.mkdir()
    client = store_client(workdir / "mlflow.db")  # a store whose one model is a lung model
    client.create_registered_model("tune-cells-lung-demo")
    client.create_model_version("tune-cells-lung-demo", source=str(tmp_path), tags={"task": "lung"})
    capsys.readouterr()  # MLflow's lines on making the store (printed when this test runs first)
    uri = f"sqlite:///{workdir}/mlflow.db"

    assert refusals(run_cli, MODEL_COMMANDS, workdir, image) == {
        f"tune-cells: error: no champion for task nuclei in {uri}: run `tune-cells search nuclei` (or "
        "`tune-cells promote nuclei VERSION`) first, or give --model-uri"}
    for model_uri, message in [
        ("runs:/abc/model", "--model-uri runs:/abc/model: expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("models:/tune-cells-nuclei", "--model-uri models:/tune-cells-nuclei: expected models:/NAME@ALIAS"),
        ("models:/tune-cells-nuclei/7", f"models:/tune-cells-nuclei/7: not found in {uri}"),
        ("models:/tune-cells-lung-demo/1", "models:/tune-cells-lung-demo/1 is a 'lung' model, not 'nuclei'"),
    ]:
        (said,) = refusals(run_cli, MODEL_COMMANDS, workdir, image, "--model-uri", model_uri)
        assert message in said, said
    assert refusals(run_cli, [["card", "nuclei", "--version", "7"], ["promote", "nuclei", "7"]], workdir, image) == {
        f"tune-cells: error: no version 7 of tune-cells-nuclei or tune-cells-nuclei-demo in {uri}"}
    (said,) = refusals(run_cli, [["card", "nuclei", "--version", "1", "--model-uri", "models:/x/1"]], workdir, image)
    assert "--version and --model-uri name the model twice" in said



def test_a_model_name_alias_or_version_the_registry_refuses_is_one_line_from_every_model_command(run_cli, tmp_path,
                                                                                                capsys):
    """MLflow refused these in its own words, after the store was opened, and they exited 1 (a
    version beyond SQLite's integer even with SQLAlchemy's overflow message)."""
    image, workdir = an_image(tmp_path), tmp_path.resolve() / "work"
    workdir.mkdir()
    store_client(workdir / "mlflow.db").create_registered_model("tune-cells-nuclei")
    capsys.readouterr()  # (MLflow's lines on making the store)
    big = "9" * 23
    for model_uri, message in [
        ("models:/a/b/c", "--model-uri models:/a/b/c: model name 'a/b' cannot hold '/' or ':'"),
        ("models:/tune-cells-nuclei@no such", "--model-uri models:/tune-cells-nuclei@no such: alias 'no such' is no "
         "alias name (letters, digits, '_' and '-', at most 255)"),
        (f"models:/tune-cells-nuclei/{big}", f"--model-uri models:/tune-cells-nuclei/{big}: version '{big}' is no "
         "version number (a whole number, at most 9223372036854775807)"),
    ]:
        (said,) = refusals(run_cli, MODEL_COMMANDS, workdir, image, "--model-uri", model_uri)
        assert said.startswith(f"tune-cells: error: {message}"), said
    assert refusals(run_cli, [["card", "nuclei", "--version", big], ["promote", "nuclei", big],
                              ["card", "nuclei", "--version", "1e3"]], workdir, image) == {
        f"tune-cells: error: version '{big}' is no version number (a whole number, at most 9223372036854775807)",
        "tune-cells: error: version '1e3' is no version number (a whole number, at most 9223372036854775807)"}

@pytest.mark.parametrize("flags, said", [
    (["--seed", "-1"], "--seed -1: must be 0 to 4294967295"),
    (["--seed", "4294967296"], "--seed 4294967296: must be 0 to 4294967295"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial nan: must be above 0"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial nan: must not be negative"),
    (["--space", "{tmp}/nan.yaml"], "parameter 'lr': float needs [low, high]"),
    (["--space", "{tmp}/long.yaml"], "choice [[1, 1, 1, 1, 1, 1, ...]] is a list"),
])
def test_search_values_that_would_fail_late_are_refused_in_one_short_line(run_cli, tmp_path, flags, said):
    (tmp_path / "nan.yaml").write_text("params:\n  model: small_convnet\n  lr: {float: [.nan, 1.0e-2]}\n")
    (tmp_path / "long.yaml").write_text("params:\n  model: small_convnet\n  width: {choices: [[[" + "1, " * 100000
                                        + "1]]]}\n")  # a YAML alias can expand to far more
    args = [flag.format(tmp=tmp_path) for flag in flags]
    result = run_cli("search", "nuclei", *args, "--workdir", tmp_path / "w")
    assert result.code == 2 and said in result.err and len(result.err) < 500, result.err[:500]
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


@pytest.mark.parametrize("space, said", [
    ("  lr: .inf\n", "parameter 'lr': inf is not a finite number"),
    ("  lr: 1.0e-3\n  weight_decay: .nan\n", "parameter 'weight_decay': nan is not a finite number"),
    ("  lr: {choices: [1.0e-3, -.inf]}\n", "parameter 'lr': -inf is not a finite number"),
    ("  lr: {float: [1.0e-4, 1.0e-2]}\ninitial_points:\n  - {lr: .nan}\n",
     "initial point, parameter 'lr': nan is not a finite number"),
])
def test_a_space_value_that_is_no_finite_number_is_refused(run_cli, tmp_path, space, said):
    (tmp_path / "space.yaml").write_text("params:\n  model: small_convnet\n" + space)
    result = run_cli("search", "nuclei", "--space", tmp_path / "space.yaml", "--workdir", tmp_path / "w",
                     "--samples", 1, "--max-epochs", 1, "--no-evaluate")  # (small, should it not be refused)
    assert result.code == 2 and said in result.err, result.err[:500]
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


@pytest.mark.parametrize("flags, said", [
    (["--storage", "{tmp}/a-file/ray"], "--storage {tmp}/a-file/ray: cannot be created or written ({tmp}/a-file is not "
                                        "a writable folder)"),
    (["--storage", "file://{tmp}/a-file"], "--storage file://{tmp}/a-file: cannot be created or written"),
    (["--experiment", "x" * 256], "bytes, at most 255 (it names folders in the workdir)"),
    (["--experiment", "é" * 128], "--experiment 'éééééé"),  # 256 bytes in UTF-8
])
def test_a_storage_or_experiment_ray_or_mlflow_cannot_use_is_refused_before_any_write(run_cli, tmp_path, flags, said):
    (tmp_path / "a-file").write_text("mine\n")  # a folder cannot be made below a file, not even by root
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8)
    result = run_cli("search", "nuclei", "--data", data, *[f.format(tmp=tmp_path) for f in flags], "--workdir",
                     tmp_path / "w", "--samples", 1, "--max-epochs", 1, "--no-evaluate")  # small, were it not refused
    assert result.code == 2 and said.format(tmp=tmp_path) in result.err, result.err[:500]
    assert len(result.err.strip().splitlines()) == 1 and len(result.err) < 500
    assert not (tmp_path / "w").exists() and (tmp_path / "a-file").read_text() == "mine\n"


def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("address, said", [
    ("127.0.0.1:{port}", "--address 127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} (Connection refused)"),
    ("ray://127.0.0.1:{port}", "--address ray://127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port}"),
    ("auto", "--address auto (found 127.0.0.1:{port}): no Ray cluster answers at 127.0.0.1:{port}"),  # RAY_ADDRESS
    ("head-node", "--address head-node: give auto, local, HOST:PORT"),
    ("http://127.0.0.1:8265", "--address http://127.0.0.1:8265: an HTTP address (Ray's dashboard?)"),
])
def test_a_ray_address_nothing_answers_at_is_refused_before_any_write(run_cli, tmp_path, monkeypatch, address, said):
    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `auto` finds (and what Ray would join)
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8)
    result = run_cli("search", "nuclei", "--data", data, "--address", address.format(port=port), "--workdir",
                     tmp_path / "w", "--samples", 1, "--max-epochs", 1, "--no-evaluate")
    assert result.code == 2 and said.format(port=port) in result.err, result.err[-500:]
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_ray_address_that_answers_passes_the_check():
    import importlib.util
    import socket

    from tune_cells.ray_places import check_ray_address

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        client = importlib.util.find_spec("grpc") is not None  # ray[client]: else the next test's line
        for address in (f"127.0.0.1:{port}", *[f"ray://127.0.0.1:{port}"] * client, f"localhost:{port}", "local", None):
            check_ray_address(address)


@pytest.mark.parametrize("flags, said", [
    (["--group-pattern", r"zzz(\d)"], "matches none of the 240 image paths"),
    (["--resume"], "--resume: no MLflow store at"),
])
def test_a_refused_search_on_demo_data_writes_no_demo_data(run_cli, tmp_path, flags, said):
    result = run_cli("search", "hep2", *flags, "--workdir", tmp_path / "w", "--samples", 1, "--max-epochs", 1,
                     "--no-evaluate")  # small, were it not refused
    assert result.code == 2 and said in result.err, result.err[-500:]
    assert not (tmp_path / "w").exists()


def test_demo_data_made_by_the_preflight_is_moved_into_the_workdir_once_it_passed(tmp_path):
    from tune_cells.preflight import SearchOptions, check_inputs, place_demo_data

    prep = check_inputs(SearchOptions(task="hep2", workdir=tmp_path / "w"))
    assert not (tmp_path / "w").exists() and prep.index.source == "demo"
    staged = prep.index.root
    place_demo_data(prep)  # what the search does under the workdir's lock
    home = tmp_path / "w" / "demo-data" / "hep2"
    assert prep.index.root == home and not staged.exists()
    assert len(list(home.rglob("*.png"))) == len(prep.index.items) and (home / ".demo.json").exists()
    again = check_inputs(SearchOptions(task="hep2", workdir=tmp_path / "w"))
    assert again.index.root.resolve() == home.resolve() and again.index.fingerprint == prep.index.fingerprint


def test_an_output_and_its_masks_folder_are_claimed_together_and_given_back_on_failure(tmp_path):
    from tune_cells.output_files import claimed, output_names

    default = tmp_path / "predictions" / "lung-1.csv"
    names = output_names(None, default, "-masks")
    (tmp_path / "predictions" / "lung-1-masks").mkdir(parents=True)  # another predict's, made since the check
    with claimed(names, "-masks") as (csv, masks):
        assert (csv.name, masks.name) == ("lung-1-2.csv", "lung-1-2-masks") and csv.is_file() and masks.is_dir()
    with pytest.raises(RuntimeError), claimed(output_names(None, default, "-masks"), "-masks") as (csv, masks):
        (masks / "half-written.png").write_bytes(b"")
        raise RuntimeError("the work failed")
    assert sorted(p.name for p in default.parent.iterdir()) == ["lung-1-2-masks", "lung-1-2.csv", "lung-1-masks"]
    given = tmp_path / "mine.csv"
    names = output_names(given, default, "-masks")
    given.write_text("mine\n")  # made since the check: never replaced
    with pytest.raises(UserInputError, match="--output .*mine.csv: already exists"), claimed(names, "-masks"):
        pass
    assert given.read_text() == "mine\n" and not (tmp_path / "mine-masks").exists()


def test_folds_that_the_groups_of_a_class_cannot_fill_are_one_line_before_anything_is_written(run_cli, tmp_path):
    """--folds K keeps each group of related images whole in one fold, and every fold needs every
    class: fewer groups than K failed in scikit-learn after Ray had started and the store, split and
    read log were written; a class in fewer groups than K left a fold without it, silently."""
    from test_splits import write_patients

    nuclei = write_kaggle(tmp_path / "nuclei", [0, 1, 2, 3] * 20, size=8)
    result = run_cli("search", "nuclei", "--data", nuclei, "--group-pattern", r"(\d)\.png$", "--folds", "10",
                     "--workdir", tmp_path / "w")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "--folds 10: the training and validation images form only" in result.err
    assert "groups of related images (a group is never split across folds)" in result.err

    patients = {f"p{n}": {"common": 6, "other": 4} for n in range(12)}
    for n in range(3):  # three patients hold the rare class: one goes to the test part, two are pooled (4
        patients[f"p{n}"]["rare"] = 2  # images: enough for 3 folds, were it not for the groups)
    result = run_cli("search", "folder", "--data", write_patients(tmp_path / "folder", patients), "--folds", "3",
                     "--workdir", tmp_path / "w")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "--folds 3: class rare has 4 training and validation images in 2 group(s) of related images" in result.err
    assert not (tmp_path / "w").exists()


def test_a_fold_deal_that_leaves_a_class_out_is_refused_naming_it():
    """scikit-learn's StratifiedGroupKFold deals whole groups greedily: a class in K groups can still
    miss a fold (it warns, and the fold's model would be scored without the class)."""
    import numpy as np

    from tune_cells.data.folds import fold_of
    from tune_cells.errors import UserInputError

    labels = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 2, 0, 0, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 2])
    groups = np.array([0] * 7 + [1] * 9 + [2] * 6 + [3] + [4] * 6)  # class c lies in groups 1, 2 and 4
    with pytest.raises(UserInputError, match=r"^--folds 3: fold \d of the deal gets no image of class [abc] "):
        fold_of(len(labels), 3, 0, labels, groups, ["a", "b", "c"])


def test_ui_refuses_a_tracking_server_and_an_unknown_scheme_before_its_banner(tmp_path):
    """MLflow's UI runs on neither: it printed the banner, then 30 lines of traceback quoting the
    password, exit 1. (A subprocess with a timeout: a ui that went on would exec MLflow's server.)"""
    import os
    import subprocess
    import sys

    from conftest import free_port

    def ui(*args, uri=None):
        env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
        env.update({"MLFLOW_TRACKING_URI": uri} if uri else {})
        return subprocess.run([sys.executable, "-m", "tune_cells", "ui", "--port", str(free_port()), "--workdir",
                               str(tmp_path / "w"), *args], env=env, capture_output=True, text=True, timeout=120)

    served = ui(uri="http://user:s3cret@127.0.0.1:9/mlflow")
    assert served.returncode == 2 and served.stdout == "" and len(served.stderr.strip().splitlines()) == 1, served
    assert "MLFLOW_TRACKING_URI http://user:***@127.0.0.1:9/mlflow: a tracking server has its own UI: open " \
           "http://127.0.0.1:9/mlflow in a browser" in served.stderr and "s3cret" not in served.stderr
    unknown = ui("--tracking-uri", "weird://x")
    assert unknown.returncode == 2 and unknown.stdout == "" and len(unknown.stderr.strip().splitlines()) == 1, unknown
    assert "--tracking-uri weird://x: MLflow has no tracking store for 'weird:' URIs" in unknown.stderr
    assert not (tmp_path / "w").exists()


def test_evaluate_seeds_checks_its_address_and_storage_as_a_search_does(run_cli, tmp_path):
    """--seeds retrains through Ray: an unreachable --address retried for minutes, an unwritable
    --storage failed after the champion was loaded."""
    (tmp_path / "a-file").write_text("mine\n")
    result = run_cli("evaluate", "nuclei", "--seeds", 2, "--storage", tmp_path / "a-file" / "ray", "--workdir",
                     tmp_path / "w")
    assert result.code == 2 and "--storage" in result.err and "cannot be created or written" in result.err
    result = run_cli("evaluate", "nuclei", "--seeds", 2, "--address", f"127.0.0.1:{closed_port()}", "--workdir",
                     tmp_path / "w")
    assert result.code == 2 and "no Ray cluster answers" in result.err, result.err[:500]
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_a_ray_client_address_without_ray_client_installed_is_one_line(tmp_path):
    """Ray Client (ray://) needs grpcio, an extra: without it a reachable ray:// address failed late."""
    import importlib.util
    import socket

    from tune_cells.ray_places import check_ray_address

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("ray[client] is installed here")
    with socket.socket() as head:  # something answers: only the missing client is wrong
        head.bind(("127.0.0.1", 0))
        head.listen()
        with pytest.raises(UserInputError, match=r"needs Ray Client: pip install 'ray\[client\]'"):
            check_ray_address(f"ray://127.0.0.1:{head.getsockname()[1]}")


def test_an_output_folder_given_for_work_that_fails_goes_again_but_written_files_stay(tmp_path):
    """explain's --output NEW/FOLDER: its first grid failing left the folders made for it."""
    from tune_cells.output_files import output_folder

    given = tmp_path / "new" / "grids"
    with pytest.raises(RuntimeError), output_folder(given, tmp_path / "default") as folder:
        folder.mkdir(parents=True)
        raise RuntimeError("the first grid failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), output_folder(given, tmp_path / "default") as folder:
        folder.mkdir(parents=True)
        (folder / "one.png").write_bytes(b"written")
        raise RuntimeError("the second grid failed")
    assert (given / "one.png").read_bytes() == b"written"


def test_a_mistyped_search_option_is_answered_before_torch_mlflow_or_ray_is_imported(tmp_path):
    """The options are checked before the seconds of imports a search needs: `--samples 0` took
    3-4 s to say one line; the same line now comes without torch, MLflow, Ray or scikit-learn."""
    code = ("import sys\nfrom tune_cells.cli import main\nsys.argv = ['tune-cells', 'search', 'nuclei', '--samples', '0']\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
            "heavy = sorted({'torch', 'mlflow', 'ray', 'sklearn'} & set(sys.modules))\n"
            "assert code == 2 and not heavy, (code, heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "tune-cells: error: --samples 0: must be at least 1"
