"""`tune-cells export` on the shared demo search's champion and on models registered beside it (a
classification fold ensemble with test-time augmentation, a lung segmentation fold ensemble with it,
a single lung network without it): the graph and its contract are written only after the parity
check against the registered model, a user who reads only the contract reproduces the registered
model's probabilities, and a real mismatch (a wrong normalisation in the contract) fails the check
and writes nothing."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import store_client

pytestmark = pytest.mark.slow

CHAMPION = "models:/tune-cells-nuclei-demo@champion"
CONTRACT_KEYS = {"model", "format", "file", "exported_with", "input", "outputs", "preprocessing", "in_graph",
                 "not_in_graph", "parity", "channels", "colour", "mean", "std", "value_range", "layout", "temperature",
                 "members"}


def tracker_of(workdir):
    from tune_cells.tracking import Tracker

    return Tracker(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlartifacts")


def parity_line(out: str) -> float:
    line = next(line for line in out.splitlines() if line.startswith("Parity: max |probability difference|"))
    return float(line.split("|probability difference| ")[1].split()[0])


@pytest.fixture(scope="module")
def store(searched, tmp_path_factory):
    """A copy of the shared search's working folder (its store is read-only), without Ray's results;
    models registered here go to an experiment of their own, with artifacts inside the copy."""
    root = tmp_path_factory.mktemp("export")
    workdir = root / "work"
    shutil.copytree(searched["workdir"], workdir, ignore=lambda folder, names: ["ray"] if folder == str(
        searched["workdir"]) else [])
    tracker = tracker_of(workdir)
    run = tracker.start_run(tracker.experiment_id("export-tests"), "registered-by-test", "search")
    return {"root": root, "workdir": workdir, "tracker": tracker, "run": run}


def test_onnx_export_of_the_champion_matches_it_and_its_contract_is_complete(searched, tmp_path, run_cli):
    import onnxruntime
    from PIL import Image

    from tune_cells.data.reader import read_log_entries

    output = tmp_path / "out" / "nuclei.onnx"
    result = run_cli("export", "nuclei", "--workdir", searched["workdir"], "--output", output)
    assert result.code == 0, result.err
    assert parity_line(result.out) <= 1e-4
    assert "Not in the graph" in result.out and "decoding" in result.out
    contract = json.loads((tmp_path / "out" / "nuclei.onnx.json").read_text())
    assert CONTRACT_KEYS | {"classes", "decode_size", "input_size", "resize", "tta"} <= set(contract)
    version = searched["client"].get_model_version_by_alias("tune-cells-nuclei-demo", "champion")
    assert contract["model"]["version"] == str(version.version) and contract["format"] == "onnx"
    assert contract["parity"]["images"] == 32 and contract["parity"]["max_abs_diff"] <= 1e-4
    assert contract["input"]["shape"] == ["batch", 3, 40, 40] and contract["input"]["dtype"] == "float32"
    assert contract["classes"] == ["normal_epithelial", "cancer_epithelial", "muscle", "immune"]
    assert contract["exported_with"]["onnx_opset"] >= 17
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nuclei.onnx", "nuclei.onnx.json"]  # no temp left
    assert [e for e in read_log_entries(searched["workdir"]) if e["purpose"] == "export parity"]

    # A consumer that reads only the contract: Pillow and numpy/torch preprocessing, onnxruntime.
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a free batch axis
    files = sorted((searched["workdir"] / "demo-data" / "nuclei" / "train").glob("*.png"))[:5]
    size, side = contract["decode_size"], contract["input_size"]
    batch = []
    for file in files:
        pixels = np.asarray(Image.open(file).convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                                  reducing_gap=None), dtype=np.float32)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                            align_corners=False)
        mean, std = (torch.tensor(contract[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        batch.append(((x - mean) / std).numpy())
    got = session.run(["probabilities"], {"input": np.concatenate(batch)})[0]
    classifier = tracker_of(searched["workdir"]).load_classifier(CHAMPION)
    expected = classifier.predict_proba(np.stack([classifier.decode_path(f) for f in files]))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_torchscript_export_of_the_champion(searched, tmp_path, run_cli):
    result = run_cli("export", "nuclei", "--format", "torchscript", "--workdir", searched["workdir"], "--output",
                     tmp_path / "nuclei.pt")
    assert result.code == 0, result.err
    assert parity_line(result.out) <= 1e-4 and "deprecates TorchScript" in result.out
    contract = json.loads((tmp_path / "nuclei.pt.json").read_text())
    assert contract["format"] == "torchscript" and contract["parity"]["runtime"].startswith("torch.jit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and says so
        module = torch.jit.load(str(tmp_path / "nuclei.pt"))
    probabilities = module(torch.zeros(3, 3, 40, 40))
    assert probabilities.shape == (3, 4) and torch.allclose(probabilities.sum(1), torch.ones(3))


def test_a_fold_ensemble_with_test_time_augmentation_is_exported_whole(store, tmp_path, run_cli):
    from tune_cells.model_io import load_spec, save_checkpoint, save_spec
    from tune_cells.tasks import get_task
    from tune_cells.tracking import model_checkpoint

    tracker = store["tracker"]
    champion = tracker.resolve_model(CHAMPION)
    single = model_checkpoint(tracker.download_model(CHAMPION, tmp_path / "download"), CHAMPION)
    spec = load_spec(single)
    ensemble = tmp_path / "ensemble"
    torch.manual_seed(1)
    for k in range(2):  # the champion's weights, the second member nudged: two different members
        network = spec.load_network(single)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.05 * k * torch.randn_like(parameter))
        save_checkpoint(ensemble / f"fold{k}", network, spec)
    save_spec(ensemble, replace(spec, members=["fold0", "fold1"], tta="dihedral", temperature=1.7))
    version = tracker.log_model(store["run"], ensemble, "tune-cells-nuclei-demo", tags=dict(champion.tags),
                                signature=get_task("nuclei").kind.signature(spec.classes))
    uri = f"models:/tune-cells-nuclei-demo/{version}"
    result = run_cli("export", "nuclei", "--model-uri", uri, "--workdir", store["workdir"])
    assert result.code == 0, result.err
    assert parity_line(result.out) <= 1e-4
    assert "2 members" in result.out and "8 flips and right-angle turns" in result.out
    written = store["workdir"] / "exports" / f"tune-cells-nuclei-demo-v{version}.onnx"
    contract = json.loads(written.with_name(written.name + ".json").read_text())
    assert (contract["members"], contract["tta"], contract["temperature"]) == (2, "dihedral", 1.7)
    assert contract["model"]["model_uri"] == uri
    again = run_cli("export", "nuclei", "--model-uri", uri, "--workdir", store["workdir"])  # the default name is taken
    assert again.code == 2 and f"version {version} is already exported as onnx (not overwritten); give --output" in \
        again.err and len(again.err.strip().splitlines()) == 1, again.err


def register_lung_segmenter(store, tmp_path, members: int, **spec_fields):
    """A lung U-Net registered in `store` beside a split of 10 generated fields: `members` fold members
    (0: one network), its spec changed by `spec_fields`. Random weights: the export is checked against
    the registered model, whatever its skill. Returns its version, the data's index and the split."""
    from tune_cells.data.demo import generate_lung
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.model_io import ModelSpec, save_checkpoint, save_spec
    from tune_cells.paths import WorkDir
    from tune_cells.tasks import get_task

    task = get_task("lung")
    index = task.importer(generate_lung(tmp_path / "lung", images=10, size=(160, 120)))
    split = load_or_create_split(WorkDir.at(store["workdir"]).split_file("lung", index.fingerprint, 0), index, 0)
    config = {"model": "unet", "encoder": "resnet18", "depth": 3, "base_width": 8, "scale": 0.5, "tile_size": 128,
              "overlap": 0.25, "threshold": 0.5, "lr": 1e-3}
    member = ModelSpec("lung", "unet", list(index.classes), 3, 0, 64, [0.7, 0.5, 0.7], [0.2, 0.2, 0.15], config,
                       kind="segmentation")
    folder = tmp_path / "segmenter"
    torch.manual_seed(2)
    if members:
        for k in range(members):
            save_checkpoint(folder / f"fold{k}", member.build(), member)
        save_spec(folder, replace(member, members=[f"fold{k}" for k in range(members)], **spec_fields))
    else:
        save_checkpoint(folder, member.build(), replace(member, **spec_fields))
    version = store["tracker"].log_model(store["run"], folder, "tune-cells-lung", tags={
        "task": "lung", "data_root": str(index.root), "split_file": str(split.path), "split_seed": 0,
        "search_run_id": store["run"]}, signature=task.kind.signature(list(index.classes)))
    return version, index, split


def test_a_lung_segmentation_ensemble_is_exported_with_its_tiling_and_thresholds(store, tmp_path, run_cli):
    version, index, split = register_lung_segmenter(store, tmp_path, 2, temperature=1.3, tta="dihedral",
                                                    thresholds={"Parenchyma": 0.4})
    store["tracker"].set_alias("tune-cells-lung", "champion", version)

    result = run_cli("export", "lung", "--workdir", store["workdir"])  # the champion, by default
    assert result.code == 0, result.err
    assert parity_line(result.out) <= 1e-4
    assert "tiling the field" in result.out and "thresholds" in result.out and "tile's 8 flips" in result.out
    written = store["workdir"] / "exports" / f"tune-cells-lung-v{version}.onnx"
    contract = json.loads(written.with_name(written.name + ".json").read_text())
    assert CONTRACT_KEYS | {"targets", "thresholds", "tiling", "activation"} <= set(contract)
    assert contract["targets"] == list(index.classes) == ["Parenchyma", "SevereInflammation"]
    assert contract["thresholds"] == {"Parenchyma": 0.4, "SevereInflammation": 0.5}
    tiling = contract["tiling"]
    assert (tiling["scale"], tiling["tile_size"], tiling["tile"], tiling["overlap"], tiling["stride"]) == (
        0.5, 128, 64, 0.25, 48)
    assert contract["input"]["shape"] == ["batch", 3, 64, 64] and (contract["members"], contract["tta"]) == (
        2, "dihedral")
    assert [o["name"] for o in contract["outputs"]] == ["probabilities", "logits"]
    assert set(contract["parity"]["details"]) == {"stitched_fields", "tile_probabilities"}
    assert contract["parity"]["images"] == len(split.parts["test"])


def test_a_segmenter_without_test_time_augmentation_is_exported_without_it(store, tmp_path, run_cli):
    """Promotion keeps no augmentation where it does not gain on validation, and none under a latency
    budget: the graph is then the plain network on a tile, and the contract says so."""
    import onnxruntime

    from tune_cells.segmentation import dihedral_logits

    version, _, split = register_lung_segmenter(store, tmp_path, 0, tta="none")
    uri = f"models:/tune-cells-lung/{version}"
    output = tmp_path / "out" / "lung.onnx"
    result = run_cli("export", "lung", "--model-uri", uri, "--workdir", store["workdir"], "--output", output)
    assert result.code == 0, result.err
    assert parity_line(result.out) <= 1e-4
    assert "tiling the field" in result.out and "flips" not in result.out and "test-time" not in result.out
    contract = json.loads((tmp_path / "out" / "lung.onnx.json").read_text())
    assert (contract["tta"], contract["members"], contract["model"]["model_uri"]) == ("none", 1, uri)
    assert contract["in_graph"] == ["the network, on one tile", "temperature: logits / 1", contract["activation"]]
    assert contract["parity"]["max_abs_diff"] <= 1e-4 and contract["parity"]["images"] == len(split.parts["test"])
    # What a consumer runs: one tile in, the network's own logits out, not the mean over the tile's 8 views.
    network = store["tracker"].load_classifier(uri).model
    tile = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": tile.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, network(tile).numpy(), atol=1e-4)
        assert np.abs(logits - dihedral_logits(network, tile).numpy()).max() > 1e-3


def test_a_wrong_contract_fails_the_parity_check_and_nothing_is_written(searched, tmp_path):
    from tune_cells.commands.export import parity_images
    from tune_cells.exporting import ONNX, ExportedModel, ParityFailed, export_checked
    from tune_cells.tasks import get_task

    task = get_task("nuclei")
    tracker = tracker_of(searched["workdir"])
    version = tracker.resolve_model(CHAMPION, "nuclei")
    predictor = tracker.load_classifier(CHAMPION)
    plan = task.kind.export_plan(predictor)
    # The graph is right; the contract tells users a normalisation the model was not trained with.
    plan.contract = replace(plan.contract, mean=[0.5] * 3, std=[0.25] * 3)
    images, source = parity_images(task, tracker, version, searched["workdir"], plan, 3, predictor.spec.store_size)
    output = tmp_path / "new-folder" / "model.onnx"
    with pytest.raises(ParityFailed, match=r"parity check failed: max \|probability difference\| .* > 0.0001"):
        export_checked(plan, ONNX, images, output, ExportedModel(CHAMPION, version.name, version.version, "nuclei",
                                                                 task.kind.name, ""), source)
    assert isinstance(ParityFailed("x"), RuntimeError)  # the CLI's exit 1, not a bad-input 2
    assert list(tmp_path.iterdir()) == []  # no graph, no contract, no temporary file, not even the folder


@pytest.mark.parametrize("args, message", [
    (["export", "nucleus"], "unknown task 'nucleus'"),
    (["export", "leukemia"], "no champion for task leukemia"),
    (["export", "nuclei", "--format", "tflite"], "Invalid value for '--format'"),
    (["export", "nuclei", "--output", "{file}/model.onnx"], "is not a folder"),
    (["export", "nuclei", "--output", "{file}"], "already exists (not overwritten)"),
    (["export", "nuclei", "--model-uri", "models:/tune-cells-nuclei-demo/99"], "not found"),
])
def test_bad_inputs_are_one_line_and_exit_2(searched, tmp_path, run_cli, args, message):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    result = run_cli(*[a.format(file=file) for a in args], "--workdir", searched["workdir"])
    assert result.code == 2, result.err
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert file.read_text() == "keep me" and list(tmp_path.iterdir()) == [file]


def test_the_shared_store_is_untouched_by_the_registrations(searched, store):
    client = store_client(searched["workdir"] / "mlflow.db")
    assert "tune-cells-lung" not in [m.name for m in client.search_registered_models()]
    versions = client.search_model_versions("name='tune-cells-nuclei-demo'")
    assert versions and all(v.tags.get("search_run_id") != store["run"] for v in versions)


def test_a_graph_that_outputs_nan_fails_parity():
    """Python's max(0.0, nan) is 0.0: a NaN difference must count as the worst, not be skipped."""
    import math

    import numpy as np

    from tune_cells.export_kinds import worse

    assert worse(0.0, np.array([0.0, 1e-6])) == 1e-6
    assert worse(0.2, np.array([0.0, 1e-6])) == 0.2
    assert worse(0.0, np.array([0.0, np.nan])) == math.inf
