import json

import numpy as np
import pytest
from PIL import Image

from tune_cells.data.images import decode_image, image_hashes, near_duplicates
from tune_cells.data.reader import SplitReader, read_log_entries
from tune_cells.data.splits import load_or_create_split, split_path
from tune_cells.errors import UserInputError
from tune_cells.tasks import get_task

from conftest import write_kaggle

nuclei = get_task("nuclei")


def test_kaggle_import(kaggle_dataset):
    index = nuclei.importer(kaggle_dataset)
    assert len(index.items) == 43
    assert index.class_counts() == {"normal_epithelial": 10, "cancer_epithelial": 12, "muscle": 10, "immune": 11}
    assert index.items["path"].iloc[0] == "train/1.png"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "train.csv").unlink(), "train.csv: missing"),
        (lambda root: (root / "train" / "3.png").unlink(), "rows without their file: train/3.png"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n1.png,7\n"), "label '7' is not one of 0..3"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n1.png,x\n"), "row 1 \\('1.png'\\): label 'x'"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n1.png,0\n2.png,\n3.png,\n"),
         "row 2 \\('2.png'\\): label '' is not one of 0..3; 1 more such row"),  # an empty label, named by its row
        (lambda root: (root / "train.csv").write_text("Name,Class\n1.png,0\n"), "needs columns Filename,Label"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n"), "no rows"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n1.png,0\n1.png,0\n"), "listed twice: 1.png"),
        (lambda root: (root / "train.csv").write_text("Filename,Label\n1.png,0\n2.png,1\n3.png,2\n"),
         "no images of class immune"),
    ],
)
def test_kaggle_import_errors_name_the_culprit(kaggle_dataset, breakage, message):
    breakage(kaggle_dataset)
    with pytest.raises(UserInputError, match=message):
        nuclei.importer(kaggle_dataset)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        nuclei.importer(tmp_path / "absent")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(b""),  # zero bytes
        lambda p: p.write_text("not an image at all"),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated, valid header
    ],
    ids=["zero-byte", "text", "truncated"],
)
def test_undecodable_images_are_named(kaggle_dataset, corrupt):
    corrupt(kaggle_dataset / "train" / "5.png")
    index = nuclei.importer(kaggle_dataset)
    with pytest.raises(UserInputError, match=r"cannot decode train/5\.png"):
        image_hashes(index.root, list(index.items["path"]))


def test_decode_handles_grey_and_16_bit(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(grey)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((10, 12), 4000, np.uint16)).save(deep)
    assert decode_image(grey, 3, 16).shape == (16, 16, 3)
    assert decode_image(grey, 3, 16)[0, 0].tolist() == [200, 200, 200]
    assert decode_image(deep, 1, 8).max() == 255  # rescaled, not clipped to white or black


def test_whole_fields_rescale_16_bit_as_tiles_do(tmp_path):
    """Segmentation decodes whole fields (`decode_full`): a 16-bit ramp keeps its shading there too,
    where Pillow's own conversion turns every value above 255 white."""
    from tune_cells.data.images import decode_full

    ramp = tmp_path / "ramp.tif"
    Image.fromarray(np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (8, 1))).save(ramp)
    field = decode_full(ramp)
    assert field.shape == (8, 64, 3)
    assert field[0, -1].tolist() == [255, 255, 255] and 120 < field[0, 32, 0] < 136  # mid-ramp stays mid-grey
    assert (field == 255).mean() < 0.05


def test_split_is_stratified_deterministic_written_once_and_reused(tmp_path):
    root = write_kaggle(tmp_path / "d", [0] * 20 + [1] * 40 + [2] * 20 + [3] * 20)
    index = nuclei.importer(root)
    path = split_path(tmp_path / "w", "nuclei", index, seed=3)
    assert path.name.startswith("nuclei-") and path.name.endswith("-3.json")
    split = load_or_create_split(path, index, seed=3)
    assert split.sizes() == {"train": 70, "val": 15, "test": 15}
    labels = dict(zip(index.items["path"], index.items["label"]))
    for part, paths in split.parts.items():
        assert {labels[p] for p in paths} == {0, 1, 2, 3}, part
    all_paths = sum(split.parts.values(), [])
    assert len(all_paths) == len(set(all_paths)) == 100

    again = load_or_create_split(tmp_path / "other.json", index, seed=3)
    assert again.parts == split.parts  # same seed, same split
    assert load_or_create_split(tmp_path / "seed4.json", index, seed=4).parts != split.parts

    # The file is the source of truth: an edit is respected on the next run.
    payload = json.loads(path.read_text())
    moved = payload["test"].pop()
    payload["train"].append(moved)
    path.write_text(json.dumps(payload))
    edited = load_or_create_split(path, index, seed=3)
    assert moved in edited.parts["train"] and moved not in edited.parts["test"]

    payload["val"].append(payload["train"][0])
    path.write_text(json.dumps(payload))
    with pytest.raises(UserInputError, match="in more than one split"):
        load_or_create_split(path, index, seed=3)


def test_tiny_class_cannot_be_split(tmp_path):
    index = nuclei.importer(write_kaggle(tmp_path / "d", [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    with pytest.raises(UserInputError, match=r"at least 3 images.*normal_epithelial \(2\)"):
        load_or_create_split(tmp_path / "s.json", index, seed=0)


def test_reader_logs_every_read(tmp_path, kaggle_dataset):
    index = nuclei.importer(kaggle_dataset)
    split = load_or_create_split(tmp_path / "s.json", index, seed=0)
    reader = SplitReader(index, split, channels=3, size=16, workdir=tmp_path)
    images, labels = reader.load("val", "selection")
    assert images.shape == (len(split.parts["val"]), 16, 16, 3) and images.dtype == np.uint8
    assert len(labels) == len(images)
    entries = read_log_entries(tmp_path)
    assert [(e["part"], e["purpose"], e["images"]) for e in entries] == [("val", "selection", len(images))]


def test_near_identical_images_are_found_and_different_ones_are_not(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((60, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(tmp_path / "a.png")
    Image.fromarray(base).save(tmp_path / "a-copy.jpg", quality=80)  # recompressed copy
    Image.fromarray(np.clip(base.astype(int) + 12, 0, 255).astype(np.uint8)).save(tmp_path / "a-brighter.png")
    Image.fromarray((rng.random((60, 60, 3)) * 255).astype(np.uint8)).save(tmp_path / "other.png")
    paths = ["a.png", "a-copy.jpg", "a-brighter.png", "other.png"]
    hashes = image_hashes(tmp_path, paths)
    pairs = {(paths[i], paths[j]) for i, j, _ in near_duplicates(hashes, hashes) if i < j}
    assert pairs == {("a.png", "a-copy.jpg"), ("a.png", "a-brighter.png"), ("a-copy.jpg", "a-brighter.png")}


def test_a_search_decodes_each_image_once_and_never_keeps_test_pixels(tmp_path, kaggle_dataset):
    from tune_cells.data.images import decode_images
    from tune_cells.preflight import decode_once

    index = nuclei.importer(kaggle_dataset)
    scan, split, decoded = decode_once(nuclei, index,
                                       lambda scan: load_or_create_split(tmp_path / "s.json", index, 0, scan.hashes),
                                       nuclei.min_store_size)
    assert not scan.kept  # the scan hands on hashes only
    assert scan.hashes.shape == (len(index.items), 4) and scan.hashes.any(axis=1).all()
    assert set(decoded) == set(split.parts["train"]) | set(split.parts["val"])  # no test pixels
    reader = SplitReader(index, split, nuclei.channels, nuclei.min_store_size, tmp_path, decoded)
    val, _ = reader.load("val", "selection")
    np.testing.assert_array_equal(val, decode_images(index.root, split.parts["val"], nuclei.channels,
                                                     nuclei.min_store_size))
    assert set(decoded) == set(split.parts["train"])  # handed over once, then dropped
    assert [e["part"] for e in read_log_entries(tmp_path)] == ["val"]  # the read is still logged


def test_a_cancelled_decoding_pass_stops_and_the_next_one_decodes(tmp_path, kaggle_dataset):
    """An interrupted search cancels its preflight's decoding thread (the images left are skipped);
    once allowed again, a pass decodes every image."""
    from tune_cells.data.images import DecodingCancelled, allow_decoding, cancel_decoding, scan_images

    index = nuclei.importer(kaggle_dataset)
    paths = list(index.items["path"])
    cancel_decoding()
    try:
        with pytest.raises(DecodingCancelled):
            scan_images(index.root, paths)
    finally:
        allow_decoding()
    assert len(scan_images(index.root, paths).hashes) == len(paths)


def test_a_signal_while_ray_starts_cancels_the_decoding_even_where_its_exception_is_swallowed():
    """Ctrl-C during Ray's start beside the decoding: the handler cancels the decoding itself, so
    a KeyboardInterrupt that Ray's start swallows still stops the search (as Interrupted, exit
    130) without waiting for the pass, and the handlers are put back."""
    import os
    import signal

    from tune_cells.data.images import _DECODING_CANCELLED, allow_decoding
    from tune_cells.errors import Interrupted
    from tune_cells.ray_progress import signals_cancel_decoding

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Interrupted) as stopped:
            with signals_cancel_decoding():
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a system call: the handler has run
                except KeyboardInterrupt:
                    pass  # swallowed on the way, as inside Ray's start
        assert stopped.value.exit_code == 130
        assert _DECODING_CANCELLED.is_set()
        allow_decoding()
        before_term = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Interrupted) as stopped:  # lost, and another error raised in its place
            with signals_cancel_decoding():
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])
                except KeyboardInterrupt:
                    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as Ray's start sets its own
                    raise RuntimeError("the half-started node failed") from None
        assert stopped.value.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is before_term  # not Ray's: SIGTERM ends a search as interrupted
    finally:
        allow_decoding()
    assert signal.getsignal(signal.SIGINT) is before
