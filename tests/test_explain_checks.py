"""`tune-cells explain` checks before it works and shows what `predict` says: it never replaces a
file, refuses an --output it cannot write in one line, decodes every input before the first grid is
written, and labels a map with the model's own class and probability (temperature and test-time
augmentation included).

The model is a copy of the format-1 fixture (tests/fixtures/model-format1) with a temperature and
dihedral test-time augmentation, registered as the nuclei champion in a fresh store: no search.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import FORMAT1_MODEL, model_copy, register_model_folder

IMAGES = FORMAT1_MODEL.parent / "model-format1-images"


@pytest.fixture
def champion(tmp_path, capsys):
    """A workdir whose nuclei champion has temperature 2.5 and dihedral TTA, and two of its images."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    register_model_folder(workdir, model_copy(tmp_path, "calibrated", format=2, temperature=2.5, tta="dihedral"),
                          alias="champion")
    for name in ("0.png", "1.png"):
        shutil.copy(IMAGES / name, tmp_path / name)
    capsys.readouterr()  # MLflow's log of creating the store is not the command's
    return {"workdir": workdir, "images": [tmp_path / "0.png", tmp_path / "1.png"]}


def explain(run_cli, champion, *args):
    return run_cli("explain", "nuclei", *args, "--steps", 2, "--workdir", champion["workdir"])


def test_explain_never_replaces_a_file(run_cli, champion, tmp_path):
    output = tmp_path / "final" / "ex"
    output.mkdir(parents=True)
    mine = output / "1_attributions.png"
    mine.write_text("mine\n")
    result = explain(run_cli, champion, *champion["images"], "--output", output)
    assert result.code == 2 and result.err.strip() == f"tune-cells: error: --output {mine}: already exists (not overwritten)"
    assert mine.read_text() == "mine\n" and [p.name for p in output.iterdir()] == [mine.name]  # 0.png's not written


def test_an_output_that_is_no_folder_is_refused_before_any_work(run_cli, champion, tmp_path):
    card = tmp_path / "out" / "card.md"
    card.parent.mkdir()
    card.write_text("mine\n")
    for output, line in [(card, f"--output {card}: is a file, not a folder"),
                         (card / "sub", f"--output {card / 'sub'}: {card} is not a folder")]:
        result = explain(run_cli, champion, champion["images"][0], "--output", output)
        assert result.code == 2 and result.err.strip() == f"tune-cells: error: {line}", result.err
    assert card.read_text() == "mine\n"


def writable(folder) -> bool:
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(probe)
    return True


def test_a_read_only_output_is_refused_before_any_work(run_cli, champion, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    # root writes in a 0o555 folder anyway; sysfs refuses even root
    read_only = next((f for f in (read_only, Path("/sys")) if f.is_dir() and not writable(f)), None)
    if read_only is None:
        pytest.skip("no folder here that this user cannot write in")
    result = explain(run_cli, champion, champion["images"][0], "--output", read_only)
    assert result.code == 2 and re.fullmatch(rf"tune-cells: error: --output {re.escape(str(read_only))}: cannot write there "
                                             r"\((Permission denied|Read-only file system)\)\n", result.err), result.err


def test_an_input_that_is_no_image_stops_explain_before_anything_is_written(run_cli, champion, tmp_path):
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    output = tmp_path / "explained"
    result = explain(run_cli, champion, champion["images"][0], text, "--output", output)
    assert result.code == 2 and result.err.strip() == f"tune-cells: error: {text}: cannot decode (UnidentifiedImageError)"
    assert not output.exists()  # not even the first image's grid


def test_explain_labels_its_maps_with_the_class_and_probability_predict_gives(run_cli, champion, tmp_path):
    predicted = run_cli("predict", "nuclei", *champion["images"], "--workdir", champion["workdir"],
                        "--output", tmp_path / "predicted.csv")
    assert predicted.code == 0, predicted.err
    table = pd.read_csv(tmp_path / "predicted.csv")
    output = tmp_path / "explained"
    result = explain(run_cli, champion, *champion["images"], "--output", output)
    assert result.code == 0, result.err
    for image, row in zip(champion["images"], table.itertuples()):
        shown = re.search(rf"^{re.escape(str(image))}: (\w+) \(p=([0-9.]+)\) -> (.+)$", result.out, re.M)
        assert shown, result.out
        assert shown[1] == row.predicted_class
        assert float(shown[2]) == pytest.approx(getattr(row, f"prob_{row.predicted_class}"), abs=5e-5)
        assert shown[3] == str(output / f"{image.stem}_attributions.png") and os.path.isfile(shown[3])


def test_predicts_in_the_same_second_each_keep_their_own_file(run_cli, champion):
    """The default --output is named by the second: another predict of that second took the name."""
    import time

    folder = champion["workdir"] / "predictions"
    folder.mkdir()
    now = time.time()  # every name the next half minute gives, taken (what a predict of that second wrote)
    theirs = {folder / f"nuclei-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}.csv" for s in range(-1, 30)}
    for taken in theirs:
        taken.write_text("theirs\n")
    for image in champion["images"]:
        result = run_cli("predict", "nuclei", image, "--workdir", champion["workdir"])
        assert result.code == 0, result.err
    assert all(taken.read_text() == "theirs\n" for taken in theirs)
    made = sorted(set(folder.iterdir()) - theirs)
    assert len(made) == 2 and all(p.name.endswith(("-2.csv", "-3.csv")) for p in made), made
    assert [pd.read_csv(p)["path"].tolist() for p in made] == [[str(i)] for i in champion["images"]]


def test_explains_in_the_same_second_each_get_their_own_folder(run_cli, champion, tmp_path):
    """The default folder is named by the second: another explain of that second made it (and wrote
    the same grid name there, which refused this one). Each explain now makes a numbered folder of
    its own; one that fails before writing leaves none."""
    import time

    folder = champion["workdir"] / "explanations"
    now = time.time()  # every name the next half minute gives, taken by an explain of that second
    theirs = [folder / f"nuclei-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}" for s in range(-1, 30)]
    for taken in theirs:
        taken.mkdir(parents=True)
        (taken / "0_attributions.png").write_text("theirs\n")
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    assert explain(run_cli, champion, champion["images"][0], text).code == 2
    assert sorted(folder.iterdir()) == sorted(theirs)  # the name it had taken is given back
    for _ in range(2):
        result = explain(run_cli, champion, champion["images"][0])
        assert result.code == 0, result.err
    assert all((taken / "0_attributions.png").read_text() == "theirs\n" for taken in theirs)
    made = sorted(set(folder.iterdir()) - set(theirs))
    assert len(made) == 2 and all(p.name.endswith(("-2", "-3")) for p in made), made
    assert all([f.name for f in p.iterdir()] == ["0_attributions.png"] for p in made)


def test_a_predict_that_fails_leaves_no_file_and_no_folder(run_cli, champion, tmp_path):
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    result = run_cli("predict", "nuclei", champion["images"][0], text, "--workdir", champion["workdir"])
    assert result.code == 2 and f"{text}: cannot decode" in result.err
    assert not (champion["workdir"] / "predictions").exists()  # the name it had taken is given back


def test_a_folder_is_predicted_without_its_hidden_files_and_a_dollar_name_is_explained(run_cli, champion, tmp_path):
    """A Mac's ._cell.png (a resource fork, no image) stopped a folder's predict with exit 2, and
    .thumbs/ copies were predicted, where the importers skip both; a name with two '$' crashed
    explain's title (matplotlib read it as TeX: exit 1)."""
    folder = tmp_path / "cells"
    (folder / ".thumbs").mkdir(parents=True)
    shutil.copy(champion["images"][0], folder / "cost_$5_vs_$6.png")
    shutil.copy(champion["images"][1], folder / ".thumbs" / "copy.png")
    (folder / "._cost_$5_vs_$6.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    result = run_cli("predict", "nuclei", folder, "--workdir", champion["workdir"], "--output", tmp_path / "p.csv")
    assert result.code == 0, result.err
    assert pd.read_csv(tmp_path / "p.csv")["path"].tolist() == [str(folder / "cost_$5_vs_$6.png")]
    result = explain(run_cli, champion, folder / "cost_$5_vs_$6.png", "--output", tmp_path / "explained")
    assert result.code == 0, result.err
    assert (tmp_path / "explained" / "cost_$5_vs_$6_attributions.png").is_file()
