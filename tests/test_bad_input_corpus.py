"""The bad-input corpus: every case exits 2 with one line naming the culprit, no traceback, and
leaves the user's MLflow store and working folder byte-for-byte as they were. A few inputs that
look odd but are valid (16-bit, greyscale, a JPEG named .png) are accepted by the same preflight."""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import short_tmpdir, store_client, write_kaggle

LABELS = [0, 1, 2, 3] * 6
SECRET = "s3cret"  # the password of the cases' tracking URIs: no case may show it


def kaggle(tmp: Path) -> Path:
    return write_kaggle(tmp / "data", LABELS)


def corrupt(tmp):
    data = kaggle(tmp)
    (data / "train" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return ["--data", data], "cannot decode train/3.png"


def zero_byte(tmp):
    data = kaggle(tmp)
    (data / "train" / "4.png").write_bytes(b"")
    return ["--data", data], "cannot decode train/4.png"


def truncated(tmp):
    data = kaggle(tmp)
    whole = (data / "train" / "5.png").read_bytes()
    (data / "train" / "5.png").write_bytes(whole[: len(whole) // 2])  # the header is intact
    return ["--data", data], "cannot decode train/5.png"


def text_as_image(tmp):
    data = kaggle(tmp)
    (data / "train" / "6.png").write_text("Filename,Label\nnot an image\n")
    return ["--data", data], "cannot decode train/6.png"


def csv_row_without_file(tmp):
    data = kaggle(tmp)
    (data / "train" / "7.png").unlink()
    return ["--data", data], "7.png"


def unknown_label(tmp):
    data = kaggle(tmp)
    (data / "train.csv").write_text((data / "train.csv").read_text().replace("8.png,3", "8.png,9"))
    return ["--data", data], "label '9' is not one of"


def missing_csv(tmp):
    data = kaggle(tmp)
    (data / "train.csv").unlink()
    return ["--data", data], "train.csv: missing"


def csv_wrong_columns(tmp):
    data = kaggle(tmp)
    (data / "train.csv").write_text("name,class\n1.png,0\n")
    return ["--data", data], "needs columns Filename,Label"


def too_few_per_class(tmp):
    data = write_kaggle(tmp / "data", [0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
    return ["--data", data], "classes need at least 3 images"


def empty_class_folder(tmp):
    data = tmp / "folder"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(data / "a" / f"{i}.png")
    return ["folder", "--data", data], "no images in class folder b"


def non_image_in_class_folder(tmp):
    data = tmp / "folder"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(data / name / f"{i}.png")
    (data / "b" / "notes.docx").write_text("x")
    return ["folder", "--data", data], "not image files"


def lung_layout(tmp, mask_size=(40, 30), drop_mask=False, bad_original=False):
    data = tmp / "lung"
    for sub in ("Original", "Parenchyma", "SevereInflammation"):
        (data / "train" / sub).mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (40, 30)).save(data / "train" / "Original" / f"{i}.jpg")
        for sub in ("Parenchyma", "SevereInflammation"):
            if not (drop_mask and i == 2 and sub == "Parenchyma"):
                Image.new("L", mask_size if i == 3 else (40, 30)).save(data / "train" / sub / f"{i}.jpg")
    if bad_original:
        (data / "train" / "Original" / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return data


def mask_wrong_size(tmp):
    return ["lung", "--data", lung_layout(tmp, mask_size=(20, 30))], "mask is 20x30, its image is 40x30"


def mask_missing(tmp):
    return ["lung", "--data", lung_layout(tmp, drop_mask=True)], "no mask Parenchyma/2.*"


def lung_image_undecodable(tmp):
    return ["lung", "--data", lung_layout(tmp, bad_original=True)], "4.jpg: not a readable image"


def unknown_task(tmp):
    return ["mitochondria"], "unknown task 'mitochondria'"


def zero_samples(tmp):
    return ["--samples", "0"], "--samples 0: must be at least 1"


def negative_samples(tmp):
    return ["--samples", "-5"], "--samples -5: must be at least 1"


def unreachable_server(tmp):
    return ["--tracking-uri", "http://127.0.0.1:9"], "tracking server http://127.0.0.1:9 does not answer"


def unwritable_workdir(tmp):
    (tmp / "a-file").write_text("")
    return ["--workdir", tmp / "a-file" / "runs"], "not writable"


def unwritable_sqlite(tmp):
    (tmp / "b-file").write_text("")
    return ["--tracking-uri", f"sqlite:///{tmp}/b-file/mlflow.db"], "not writable"


def too_many_gpus(tmp):
    return ["--gpus-per-trial", "8"], "--gpus-per-trial 8: this machine has 0 GPUs"


def space_syntax_error(tmp):
    (tmp / "space.yaml").write_text("params:\n  lr: {float: [0.1, 1]\n")
    return ["--space", tmp / "space.yaml"], "YAML syntax error at line"


def space_unknown_model(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: transformer9000\n  lr: 0.01\n")
    return ["--space", tmp / "space.yaml"], "unknown model 'transformer9000'"


def space_unknown_loss(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: unet\n  loss: focal_typo\n  lr: 0.01\n")
    return ["lung", "--space", tmp / "space.yaml"], "unknown loss 'focal_typo'"


def space_misspelt_parameter(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: 0.01\n  weight_decy: 0.001\n")
    return ["--space", tmp / "space.yaml"], "unknown parameter 'weight_decy' for model small_convnet; known: "


def space_value_outside_its_set(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: unet\n  encoder: {choices: [resnet18, vgg16]}\n  lr: 0.01\n")
    return ["lung", "--space", tmp / "space.yaml"], "parameter 'encoder' = 'vgg16' is not allowed"


def space_model_of_another_kind(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: unet\n  lr: 0.01\n")
    return ["--space", tmp / "space.yaml"], "model unet is a segmentation model; this task is classification"


def resume_without_search(tmp):
    return ["--resume"], "has no search to resume"


def space_step_zero(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: {float: [0.001, 0.1], step: 0}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'lr': step must be a number above 0, not 0"


def space_negative_step(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: 0.01\n  depth: {int: [2, 4], step: -1}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'depth': step must be a number above 0, not -1"


def space_log_with_step(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: {float: [0.001, 0.1], log: true, "
                                    "step: 0.001}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'lr': give log or step, not both"


def space_choices_of_mappings(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: 0.01\n"
                                    "  optimizer: {choices: [{name: adamw}, sgd]}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'optimizer': choice {'name': 'adamw'} is a dict"


def space_lr_per_optimiser_leaves_one_out(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  optimizer: {choices: [adamw, sgd]}\n  lr:\n"
                                    "    - {float: [2.0e-4, 3.0e-3], log: true, when: {optimizer: adamw}}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'lr': no alternative applies when optimizer='sgd'"


def space_choices_of_lists(tmp):
    (tmp / "space.yaml").write_text("params:\n  model: small_convnet\n  lr: 0.01\n  width: {choices: [[16, 32], 64]}\n")
    return ["--space", tmp / "space.yaml"], "parameter 'width': choice [16, 32] is a list"


def space_is_a_folder(tmp):
    (tmp / "spaces").mkdir()
    return ["--space", tmp / "spaces"], "spaces: a folder; give a space file"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reads stderr: one line, the error
        pass


_SERVERS: list[ThreadingHTTPServer] = []


@pytest.fixture(autouse=True)
def _stop_web_servers():
    yield
    while _SERVERS:
        server = _SERVERS.pop()
        server.shutdown()
        server.server_close()


def plain_web_server(folder: Path) -> str:
    """`python -m http.server` in this process: it answers /health (a file) and nothing MLflow."""
    folder.mkdir()
    (folder / "health").write_text("OK")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SERVERS.append(server)
    return f"http://127.0.0.1:{server.server_port}"


def non_mlflow_server(tmp):
    url = plain_web_server(tmp / "site").replace("http://", f"http://user:{SECRET}@")
    return ["--tracking-uri", url], "answers /health but is not an MLflow server"


def file_store(tmp):
    return ["--tracking-uri", f"file://{tmp}/mlruns"], "a file store has no model registry"


def postgres_without_driver(tmp):
    return (["--tracking-uri", f"postgresql://user:{SECRET}@127.0.0.1:5432/mlflow"],
            "postgresql://user:***@127.0.0.1:5432/mlflow: its database driver is not installed")


def mysql_without_driver(tmp):
    return ["--tracking-uri", f"mysql://user:{SECRET}@127.0.0.1/mlflow"], "no module 'MySQLdb'"


def password_of_an_unreachable_server(tmp):
    return (["--tracking-uri", f"http://user:{SECRET}@127.0.0.1:9"],
            "tracking server http://user:***@127.0.0.1:9 does not answer")


def csv_path_leaves_the_data(tmp):
    data = kaggle(tmp)
    shutil.copy(data / "train" / "1.png", tmp / "outside.png")
    (data / "train.csv").write_text((data / "train.csv").read_text().replace("\n2.png,", "\n../../outside.png,"))
    return ["--data", data], "../../outside.png resolves outside the data folder"


def symlink_leaves_the_data(tmp):
    data = kaggle(tmp)
    shutil.copy(data / "train" / "1.png", tmp / "elsewhere.png")
    (data / "train" / "2.png").unlink()
    (data / "train" / "2.png").symlink_to(tmp / "elsewhere.png")
    return ["--data", data], "train/2.png resolves outside the data folder"


def one_file_two_spellings(tmp):
    data = kaggle(tmp)
    (data / "train.csv").write_text((data / "train.csv").read_text().replace("\n5.png,", "\n./1.png,"))
    return ["--data", data], "one image listed twice, as train/1.png and train/./1.png"


def hep2_id_not_ascii_digits(tmp):
    data = tmp / "hep2"
    data.mkdir()
    (data / "gt_training.csv").write_text("Image ID,Image class\n1,Homogeneous\n\u00b2,Speckled\n")
    return ["hep2", "--data", data], "Image ID must be a number (digits 0-9): \u00b2"


def experiment_absolute(tmp):
    return ["--experiment", tmp / "elsewhere"], "must be a plain name"


def experiment_parent(tmp):
    return ["--experiment", ".."], "--experiment '..': must be a plain name"


CASES = [corrupt, zero_byte, truncated, text_as_image, csv_row_without_file, unknown_label, missing_csv,
         csv_wrong_columns, too_few_per_class, empty_class_folder, non_image_in_class_folder, mask_wrong_size,
         mask_missing, lung_image_undecodable, unknown_task, zero_samples, negative_samples, unreachable_server,
         unwritable_workdir, unwritable_sqlite, too_many_gpus, space_syntax_error, space_unknown_model,
         space_unknown_loss, space_misspelt_parameter, space_value_outside_its_set, space_model_of_another_kind,
         resume_without_search, space_step_zero, space_negative_step, space_log_with_step, space_choices_of_mappings,
         space_choices_of_lists, space_lr_per_optimiser_leaves_one_out, space_is_a_folder, non_mlflow_server, file_store, postgres_without_driver,
         mysql_without_driver, password_of_an_unreachable_server, csv_path_leaves_the_data, symlink_leaves_the_data,
         one_file_two_spellings, hep2_id_not_ascii_digits, experiment_absolute, experiment_parent]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes (and so of the MLflow store's)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory) -> Path:
    """A working folder that already holds a user's MLflow store and files."""

    folder = tmp_path_factory.mktemp("store") / "work"
    folder.mkdir()
    client = store_client(folder / 'mlflow.db')
    run = client.create_run(client.create_experiment("earlier-work"))
    client.log_metric(run.info.run_id, "val_dice", 0.9)
    (folder / "notes.txt").write_text("the user's own file")
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_in_one_line_and_changes_nothing(case, run_cli, tmp_path, existing_store, monkeypatch):
    monkeypatch.setenv("TUNE_CELLS_RAY_TMPDIR", short_tmpdir("tcr"))
    workdir = tmp_path / "work"
    shutil.copytree(existing_store, workdir)
    args, message = case(tmp_path)
    task = [] if args and args[0] in ("folder", "lung", "hep2", "mitochondria") else ["nuclei"]
    if "--data" not in args and not task == []:  # real data: demo data would be generated in the workdir
        args = [*args, "--data", kaggle(tmp_path)]
    before = fingerprint(workdir)
    result = run_cli("search", *task, *map(str, args), *([] if "--workdir" in args else ["--workdir", workdir]))
    lines = result.err.strip().splitlines()
    assert result.code == 2, result.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("tune-cells: error:"), result.err
    assert message in lines[0]
    assert "Traceback" not in result.err
    assert SECRET not in result.out + result.err
    assert fingerprint(workdir) == before


@pytest.mark.parametrize("kind", ["sixteen_bit", "greyscale", "jpeg_named_png"])
def test_odd_but_valid_images_pass_the_preflight(kind, tmp_path):
    from tune_cells.preflight import SearchOptions, check_inputs, check_pixels

    data = kaggle(tmp_path)
    target = data / "train" / "2.png"
    if kind == "sixteen_bit":  # rescaled to 8 bit by its own range, not clipped
        Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 90).astype(np.uint16)).save(target)
    elif kind == "greyscale":  # repeated to RGB for an RGB task
        Image.new("L", (24, 24), 100).save(target)
    else:  # PIL reads the content, not the extension
        Image.new("RGB", (24, 24), (10, 200, 30)).save(target, format="JPEG")
    prep = check_inputs(SearchOptions(task="nuclei", data=data, workdir=tmp_path / "w"))
    check_pixels(prep)  # the search's preflight, in its order (run_search)
    assert len(prep.index.items) == len(LABELS)
    assert not (tmp_path / "w").exists()  # the preflight writes nothing
    from tune_cells.data.images import decode_image

    pixels = decode_image(target, 3, 24)
    assert pixels.shape == (24, 24, 3) and pixels.max() > 0
