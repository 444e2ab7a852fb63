"""Data folders as users' machines leave them: hidden folders, pipes and broken links, split folders
of their own, masks saved in other encodings. Each is read right or refused in one line naming it."""

from __future__ import annotations

import io
import os
import struct
import unicodedata
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import ExifTags, Image, TiffImagePlugin
from test_importers_more import hep2, image, write_hep2
from test_segmentation import write_lung

from tune_cells.data.images import decode_image, mask_array
from tune_cells.data.importers import import_image_folder, import_lung_masks
from tune_cells.errors import UserInputError

from conftest import model_copy, register_model_folder, write_kaggle


def folder_dataset(root):
    for name in ("a", "b"):
        for k in range(3):
            image(root / name / f"{k}.png")
    return root


def test_images_in_hidden_folders_are_not_the_dataset(tmp_path):
    root = folder_dataset(tmp_path / "d")
    image(root / "a" / ".thumbs" / "b-cell.png")  # a viewer's cache: another class's thumbnail
    image(root / "a" / ".ipynb_checkpoints" / "x.png")
    assert sorted(import_image_folder(root).items["path"]) == [f"{c}/{k}.png" for c in "ab" for k in range(3)]


@pytest.mark.parametrize("make", ["fifo", "broken link"])
def test_a_pipe_or_a_broken_link_named_like_an_image_is_refused_not_read(tmp_path, make):
    root = folder_dataset(tmp_path / "d")
    odd = root / "a" / "odd.png"
    os.mkfifo(odd) if make == "fifo" else os.symlink(tmp_path / "gone.png", odd)  # a pipe's read would block forever
    with pytest.raises(UserInputError, match=r"odd\.png: not a regular file"):
        import_image_folder(root)


def test_hep2_training_and_test_folders_keep_test_as_the_test_part(tmp_path):
    from tune_cells.data.splits import make_parts

    index = hep2.importer(write_hep2(tmp_path, ["training", "test"], per_class=8))
    parts = make_parts(index, seed=0)
    assert parts["test"] and all(p.startswith("test/") for p in parts["test"])
    assert parts["val"] and all(p.startswith("training/") for p in parts["train"] + parts["val"])


def test_hep2_split_folders_without_training_are_refused(tmp_path):
    write_hep2(tmp_path, ["validation", "test"])
    with pytest.raises(UserInputError, match="validation/, test/ without training/"):
        hep2.importer(tmp_path)


def test_a_hep2_folder_without_labels_is_not_used_and_said_so(tmp_path, caplog):
    """The contest ships an unlabelled test/: with training/ and validation/ labelled, validation/
    stays the test part (an empty test part before), and test/'s images are no part at all."""
    write_hep2(tmp_path, ["training", "validation", "test"], per_class=6)
    csv = tmp_path / "gt_training.csv"
    unlabelled = {path.stem.lstrip("0") for path in (tmp_path / "test").iterdir()}
    csv.write_text("".join(line + "\n" for line in csv.read_text().splitlines() if line.split(",")[0] not in unlabelled))
    with caplog.at_level("INFO", logger="tune_cells.data.importers"):
        index = hep2.importer(tmp_path)
    assert "test/: none of its images is in gt_training.csv: unlabelled, not used" in caplog.text
    assert not any(path.startswith("test/") for path in index.items["path"])
    assert set(index.items.loc[index.items["path"].str.startswith("validation/"), "split"]) == {"test"}


def test_a_split_the_layout_fixes_may_not_leave_a_part_empty(tmp_path):
    from tune_cells.data.splits import make_parts

    index = hep2.importer(write_hep2(tmp_path, ["training", "validation", "test"], per_class=3))
    index.items.loc[index.items["split"] == "val", "split"] = "train"  # every image fixed, none in val
    with pytest.raises(UserInputError, match="own split leaves the val part empty"):
        make_parts(index, seed=0)


@pytest.mark.parametrize("encoding", ["0/1 grey", "palette", "bilevel", "0/255 grey"])
def test_lossless_masks_of_two_levels_mark_their_target(tmp_path, encoding):
    truth = np.zeros((8, 10), bool)
    truth[2:5, 3:7] = True
    if encoding == "palette":
        mask = Image.fromarray(truth.astype(np.uint8), "P")
        mask.putpalette([0, 0, 0, 200, 0, 0])  # index 1 is dark red: 60 in grey
    elif encoding == "bilevel":
        mask = Image.fromarray(truth)
    else:
        mask = Image.fromarray(truth.astype(np.uint8) * (1 if encoding == "0/1 grey" else 255))
    mask.save(tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as opened:
        assert (mask_array(opened) == truth).all()


def test_a_jpeg_mask_is_thresholded_so_its_noise_is_no_target(tmp_path):
    faint = np.zeros((16, 16), np.uint8)
    faint[4:12, 4:12] = 1  # what compression can leave on a black mask: two levels, 0 and 1, once decoded
    Image.fromarray(faint).save(tmp_path / "mask.jpg", quality=100)
    with Image.open(tmp_path / "mask.jpg") as opened:
        assert set(np.unique(np.asarray(opened)).tolist()) == {0, 1}
        assert not mask_array(opened).any()


def test_a_target_whose_every_mask_is_empty_is_refused_before_training(tmp_path):
    from tune_cells.tasks import get_task

    root = write_lung(tmp_path / "lung")
    for mask in (root / "train" / "SevereInflammation").iterdir():
        Image.new("L", (60, 40), 0).save(mask)
    index = import_lung_masks(root)
    with pytest.raises(UserInputError, match="every SevereInflammation mask is empty"):
        get_task("lung").kind.decode_for_search(get_task("lung"), index, 0)


def test_lung_refuses_two_masks_of_one_field_and_names_a_bomb(tmp_path):
    root = write_lung(tmp_path / "lung")
    Image.new("L", (60, 40), 255).save(root / "train" / "Parenchyma" / "im0.png")
    with pytest.raises(UserInputError, match="Parenchyma/: two masks for im0: im0.jpg and im0.png"):
        import_lung_masks(root)
    (root / "train" / "Parenchyma" / "im0.png").unlink()
    Image.new("1", (9000, 9000)).save(root / "train" / "Original" / "im1.png")  # 81 MP, a few kB
    (root / "train" / "Original" / "im1.jpg").unlink()
    with pytest.raises(UserInputError, match=r"im1\.png: 9000x9000 pixels, over the limit"):
        import_lung_masks(root)


def test_float_images_decode_by_their_range_not_to_black(tmp_path):
    ramp = np.tile(np.linspace(-0.1, 1.0, 32, dtype=np.float32), (8, 1))  # 0-1 floats, a little negative
    Image.fromarray(ramp, "F").save(tmp_path / "float.tif")
    pixels = decode_image(tmp_path / "float.tif", 1, 32)
    assert pixels[..., 0].max() >= 250 and pixels[0, 0, 0] == 0 and 100 < pixels[0, 16, 0] < 150


def test_a_hep2_id_listed_twice_is_named_with_its_file(tmp_path):
    write_hep2(tmp_path, ["training", "validation"])
    csv = tmp_path / "gt_training.csv"
    csv.write_text(csv.read_text() + "1,Golgi\n")
    with pytest.raises(UserInputError, match=r"gt_training.csv: Image ID listed twice: 1$"):
        hep2.importer(tmp_path)


def test_images_beside_the_class_folders_and_a_file_as_data_are_refused(tmp_path):
    root = folder_dataset(tmp_path / "d")
    image(root / "stray.png")
    with pytest.raises(UserInputError, match=r"images outside the class folders: stray\.png"):
        import_image_folder(root)
    with pytest.raises(UserInputError, match=r"stray\.png: a file; give the dataset's folder"):
        import_image_folder(root / "stray.png")


CAFE_NFC, CAFE_NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")  # typed; macOS


def test_a_class_folder_in_either_unicode_form_is_one_class_named_in_nfc(tmp_path):
    for form in (CAFE_NFC, CAFE_NFD):
        root = tmp_path / ascii(form).strip("'").replace("\\", "")
        for name in ("a", form):
            for k in range(3):
                image(root / name / f"{k}.png")
        index = import_image_folder(root)
        assert index.classes == ["a", CAFE_NFC] and index.class_counts() == {"a": 3, CAFE_NFC: 3}
        assert all((root / path).is_file() for path in index.items["path"])  # paths stay as on disk
        decode_image(root / index.items["path"].iloc[-1], 3, 8)


def test_groups_csv_names_a_file_in_either_unicode_form(tmp_path):
    """A groups.csv typed on Linux (NFC) names a file a Mac wrote decomposed (NFD): 'not an image of the dataset'."""
    for name in ("a", "b"):
        for k in range(3):
            image(tmp_path / name / f"{k}{CAFE_NFD}.png")
    (tmp_path / "groups.csv").write_text(f"path,group\na/0{CAFE_NFC}.png,p1\nb/0{CAFE_NFC}.png,p1\n")
    index = import_image_folder(tmp_path)
    grouped = index.items.loc[index.items["group"].notna(), "path"].tolist()
    assert sorted(grouped) == [f"a/0{CAFE_NFD}.png", f"b/0{CAFE_NFD}.png"]  # paths as on disk


def test_two_folders_of_one_name_in_two_unicode_forms_are_refused_naming_both(tmp_path):
    for name in ("a", CAFE_NFC, CAFE_NFD):
        for k in range(3):
            image(tmp_path / name / f"{k}.png")
    with pytest.raises(UserInputError) as refused:
        import_image_folder(tmp_path)
    assert str(refused.value) == (f"{tmp_path}: folders 'cafe\\u0301' and 'caf\\xe9' are one name, café, in two "
                                  "Unicode forms (NFC and NFD, as macOS writes it): merge them into one folder")


@pytest.mark.slow  # (an evaluation run each, ~6 s)
@pytest.mark.parametrize("model_form, data_form", [(CAFE_NFD, CAFE_NFC), (CAFE_NFC, CAFE_NFD)])
def test_evaluate_matches_a_class_whatever_unicode_form_model_and_data_hold(run_cli, tmp_path, capsys, model_form,
                                                                            data_form):
    """A model trained on folders from macOS (NFD, before names were normalised) scores data typed on
    Linux (NFC), and a model of today's (NFC) scores data copied from a Mac."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    register_model_folder(workdir, model_copy(tmp_path, "model", task="folder", classes=["a", model_form]),
                          name="tune-cells-folder", alias="champion", task="folder")
    rng = np.random.default_rng(0)
    for name in ("a", data_form):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{k}.png")
    capsys.readouterr()
    result = run_cli("evaluate", "folder", "--data", tmp_path / "data", "--workdir", workdir, "--bootstrap", 20)
    assert result.code == 0, result.err
    assert f"on 6 images of {tmp_path / 'data'}" in result.out


def png_16_bit(samples: np.ndarray, exif: bytes = b"") -> bytes:
    """A 16-bit PNG (Pillow writes none) of H×W×C uint16 samples (C 2: grey + alpha, 3: RGB, 4: RGBA), every
    row Paeth-filtered: its predictor reads the pixel to the left, so a decoder that took the
    wrong bytes per pixel would not come out right."""
    height, width, channels = samples.shape
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int16)
    bpp, filtered = 2 * channels, []
    for y in range(height):
        up = rows[y - 1] if y else np.zeros_like(rows[y])
        left, up_left = (np.concatenate([np.zeros(bpp, np.int16), r[:-bpp]]) for r in (rows[y], up))
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        filtered.append(b"\x04" + ((rows[y] - predicted) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    exif_chunk = chunk(b"eXIf", exif.removeprefix(b"Exif\x00\x00")) if exif else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + exif_chunk
            + chunk(b"IDAT", zlib.compress(b"".join(filtered))) + chunk(b"IEND", b""))


def tiff_16_bit_rgb(samples: np.ndarray, order: str = "<", deflate: bool = False) -> bytes:
    """A one-strip 16-bit RGB TIFF (Pillow writes none) of H×W×3 uint16 samples, little- or
    big-endian, raw or deflated (which Pillow hands to libtiff)."""
    height, width, _ = samples.shape
    data = samples.astype(f"{order}u2").tobytes()
    data = zlib.compress(data) if deflate else data
    short = [(256, width), (257, height), (259, 8 if deflate else 1), (262, 2), (277, 3), (278, height), (284, 1)]
    entries = [struct.pack(f"{order}HHIHH", tag, 3, 1, value, 0) for tag, value in short]
    entries += [struct.pack(f"{order}HHII", 258, 3, 3, 134), struct.pack(f"{order}HHII", 273, 4, 1, 140),
                struct.pack(f"{order}HHII", 279, 4, 1, len(data))]
    ifd = struct.pack(f"{order}H", 10) + b"".join(sorted(entries, key=lambda e: struct.unpack(f"{order}H", e[:2])))
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(f"{order}I", 8)
    return header + ifd + struct.pack(f"{order}I", 0) + struct.pack(f"{order}3H", 16, 16, 16) + data


TWELVE_BIT = np.stack([np.tile(np.linspace(0, 4095, 40), (6, 1)),  # a ramp, a falling ramp, a constant
                       np.tile(np.linspace(4095, 0, 40), (6, 1)), np.full((6, 40), 1234.0)], axis=-1).astype(np.uint16)


@pytest.mark.parametrize("kind", ["png", "png rgba", "png grey+alpha", "tiff", "tiff big-endian deflate"])
@pytest.mark.parametrize("given_as", ["path", "file object"])
def test_16_bit_colour_is_rescaled_by_its_own_range_not_cut_to_its_high_byte(tmp_path, kind, given_as):
    """12-bit colour in 16 bits came out dark (Pillow keeps each sample's high byte: 4095 -> 15).
    Now as 16-bit grey is read: the samples over the image's maximum, every channel alike."""
    from tune_cells.data.images import decode_full

    samples = np.repeat(TWELVE_BIT[..., :1], 3, axis=-1) if "grey" in kind else TWELVE_BIT
    if kind.startswith("png"):
        opaque = np.full(TWELVE_BIT.shape[:2] + (1,), 65535, np.uint16)
        colour = TWELVE_BIT[..., :1] if "grey" in kind else TWELVE_BIT
        data = png_16_bit(np.concatenate([colour, opaque], axis=-1) if kind != "png" else TWELVE_BIT)
    else:
        data = tiff_16_bit_rgb(TWELVE_BIT, *((">", True) if "big" in kind else ()))
    (tmp_path / "deep").write_bytes(data)
    source = tmp_path / "deep" if given_as == "path" else io.BytesIO(data)
    expected = (samples.astype(np.float32) / 4095 * 255).astype(np.uint8)
    assert np.array_equal(decode_full(source), expected)
    grey = tmp_path / "grey.png"  # the red ramp alone, as 16-bit grey: the same pixels
    Image.fromarray(TWELVE_BIT[..., 0]).save(grey)
    assert np.array_equal(decode_image(grey, 1, 40)[..., 0], decode_image(source, 3, 40)[..., 0])


def tiff_pages(path, pages: int, reduced: bool = False) -> None:
    """A TIFF of `pages` 16x16 pages, the later ones marked reduced-resolution copies if `reduced`."""
    with TiffImagePlugin.AppendingTiffWriter(path, new=True) as tiff:
        for page in range(pages):
            Image.new("L", (16 >> page if reduced else 16,) * 2, 40 * page).save(
                tiff, "TIFF", tiffinfo={254: 1 if reduced and page else 0})
            tiff.newFrame()


def test_a_multi_page_tiff_is_refused_in_one_line_naming_it(tmp_path):
    """A stack was read as its first page, silently. A pyramid (later pages marked reduced-resolution
    copies) is still read: its first page is the image."""
    from mlflow.exceptions import MlflowException

    from tune_cells.data.images import MultiPageTiff, decode_images, open_image
    from tune_cells.predict import decode_files
    from tune_cells.pyfunc import _row_errors

    tiff_pages(tmp_path / "stack.tif", 3)
    with pytest.raises(MultiPageTiff, match="a TIFF of 3 pages"):
        decode_image(tmp_path / "stack.tif", 1, 16)
    with pytest.raises(UserInputError, match=r"cannot decode stack\.tif: a TIFF of 3 pages"):  # a search's decoding
        decode_images(tmp_path, ["stack.tif"], 1, 16)
    with pytest.raises(UserInputError, match=r"stack\.tif: a TIFF of 3 pages"):  # predict's
        decode_files(SimpleNamespace(decode_path=lambda path: decode_image(path, 1, 16)), [tmp_path / "stack.tif"])
    with pytest.raises(MlflowException, match=r"^row 0 \(image\): a TIFF of 3 pages"):  # a served row's 400
        with _row_errors(0, "image"):
            open_image(io.BytesIO((tmp_path / "stack.tif").read_bytes()))
    tiff_pages(tmp_path / "pyramid.tif", 3, reduced=True)
    assert decode_image(tmp_path / "pyramid.tif", 1, 16).max() == 0  # the first page, black
    with open_image(tmp_path / "pyramid.tif") as pyramid:
        assert pyramid.tell() == 0 and pyramid.size == (16, 16)


@pytest.mark.slow  # (a search's preflight, ~10 s)
def test_a_search_on_a_multi_page_tiff_exits_2_naming_it(run_cli, tmp_path):
    data = write_kaggle(tmp_path / "data", [0, 1, 2, 3] * 8)
    tiff_pages(data / "train" / "2.png", 2)  # by content, whatever its name
    result = run_cli("search", "nuclei", "--data", data, "--workdir", tmp_path / "work")
    assert result.code == 2 and "cannot decode train/2.png: a TIFF of 2 pages" in result.err, result.err


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P with a transparent index"])
def test_transparent_pixels_are_white_whatever_colour_lies_under_them(tmp_path, mode):
    """The colour under a fully transparent pixel was read as it is (here black, or red: what an
    eraser left); now every translucent image is composited onto white first."""
    from tune_cells.data.images import decode_full

    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:, :4] = (255, 0, 0)  # left half red, right half black
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:4], alpha[4:, :2] = 255, 128  # top opaque; bottom left half-translucent, the rest transparent
    if mode == "RGBA":
        picture = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    elif mode == "LA":
        picture = Image.fromarray(np.dstack([colour[..., 1], alpha]), "LA")  # black
    else:
        picture = Image.fromarray(np.where(alpha == 255, colour[..., 0] // 255, 2).astype(np.uint8), "P")
        picture.putpalette([0, 0, 0, 255, 0, 0, 255, 0, 0])
        picture.info["transparency"] = 2  # index 2, red, is transparent
    picture.save(tmp_path / "picture.png")
    pixels = decode_full(tmp_path / "picture.png")
    grey = decode_image(tmp_path / "picture.png", 1, 8)[..., 0]
    assert (pixels[6:, 4:] == 255).all() and (grey[6:, 4:] == 255).all()  # transparent: white
    assert pixels[0, 0].tolist() == ([0, 0, 0] if mode == "LA" else [255, 0, 0])  # opaque: its colour
    assert pixels[0, 7].tolist() == [0, 0, 0]
    if mode != "P with a transparent index":
        assert 120 < pixels[6, 0, 1] < 135  # half-translucent red or black: green half white


def test_a_mask_on_a_transparent_layer_marks_only_what_is_drawn(tmp_path):
    """A mask exported as white strokes on a transparent white layer was read all white (every
    pixel the target); transparent pixels of a mask are background."""
    stroke = np.zeros((8, 10), bool)
    stroke[2:5, 3:7] = True
    Image.fromarray(np.dstack([np.full((8, 10, 3), 255, np.uint8), stroke.astype(np.uint8) * 255]),
                    "RGBA").save(tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as opened:
        assert (mask_array(opened) == stroke).all()


def with_orientation(array: np.ndarray, path, orientation: int) -> None:
    """`array` saved (format by suffix) with an EXIF orientation tag, as a camera leaves it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    picture = Image.fromarray(array)
    if path.suffix == ".tif":
        picture.save(path, tiffinfo={ExifTags.Base.Orientation: orientation})
    else:
        picture.save(path, exif=exif, **({"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}))


UPRIGHT = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: np.rot90}  # as the tag says


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", " grey.tif"])
@pytest.mark.parametrize("orientation", [3, 6])
def test_an_exif_orientation_is_applied_by_every_decoding_path(tmp_path, suffix, orientation):
    """The tag was ignored: a camera's turned photo was learnt and predicted on its side (Pillow
    turns a TIFF itself, but garbled an uncompressed grey one read from a path: predict and
    training disagreed with the server)."""
    from tune_cells.data.images import decode_full, decode_images

    stored = np.zeros((16, 24, 3), np.uint8)
    stored[:8, :8], stored[8:, 16:], stored[:, 8:16, 2] = (250, 0, 0), (0, 250, 0), 120  # asymmetric blocks
    stored = stored.max(axis=-1) if "grey" in suffix else stored
    with_orientation(stored, tmp_path / f"turned{suffix}", orientation)
    upright = UPRIGHT[orientation](stored)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    tolerance = 8 if suffix == ".jpg" else 0
    for source in (tmp_path / f"turned{suffix}", io.BytesIO((tmp_path / f"turned{suffix}").read_bytes())):  # predict, serve
        decoded = decode_full(source)[..., 0] if "grey" in suffix else decode_full(source)
        assert np.abs(decoded.astype(int) - upright).max() <= tolerance
    trained = decode_images(tmp_path, [f"turned{suffix}"], 3, 12)[0]  # a search's decoding
    assert np.abs(trained.astype(int) - decode_image(tmp_path / "upright.png", 3, 12)).max() <= tolerance


def test_a_lung_mask_turned_by_its_exif_tag_lies_as_its_image_does(tmp_path):
    """A mask stored on its side with an orientation tag was refused (its size seemed swapped) or
    read on its side; each file is turned by its own tag."""
    from tune_cells.data.images import decode_full, decode_mask

    root = write_lung(tmp_path / "lung")  # 60x40 fields and masks, JPEG
    target = np.zeros((40, 60), np.uint8)
    target[:10, :20] = 255  # top left
    mask = root / "train" / "Parenchyma" / "im0.jpg"
    with_orientation(np.rot90(target), mask, 6)  # stored 40 wide, 60 high; the tag turns it back
    index = import_lung_masks(root)
    assert index.mask_paths("Parenchyma")[0] == "train/Parenchyma/im0.jpg"
    assert (decode_mask(mask) == (target > 127)).all()
    assert decode_full(root / "train" / "Original" / "im0.jpg").shape[:2] == (40, 60)


def test_16_bit_colour_is_turned_by_its_exif_tag_too(tmp_path):
    from tune_cells.data.images import decode_full

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    (tmp_path / "deep.png").write_bytes(png_16_bit(TWELVE_BIT, exif.tobytes()))
    upright = np.rot90((TWELVE_BIT.astype(np.float32) / 4095 * 255).astype(np.uint8), -1)
    assert np.array_equal(decode_full(tmp_path / "deep.png"), upright)


def test_a_float_image_with_no_finite_value_is_refused_naming_why(tmp_path):
    """An all-NaN float TIFF (a failed export) decoded to a black image that was trained on or
    predicted, with numpy's 'All-NaN slice' warning on stderr; one with some NaN still reads."""
    from tune_cells.data.images import decode_images
    from tune_cells.predict import decode_files

    Image.fromarray(np.full((24, 24), np.nan, dtype=np.float32), mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(np.where(np.eye(24) > 0, np.nan, 3.0).astype(np.float32), mode="F").save(tmp_path / "some.tif")
    with pytest.raises(UserInputError, match=r"cannot decode nan\.tif: no finite pixel value, all NaN or infinite$"):
        decode_images(tmp_path, ["nan.tif"], 1, 16)
    with pytest.raises(UserInputError, match=r"nan\.tif: no finite pixel value"):  # predict's
        decode_files(SimpleNamespace(decode_path=lambda path: decode_image(path, 1, 16)), [tmp_path / "nan.tif"])
    assert decode_image(tmp_path / "some.tif", 1, 16).max() > 0
