"""TIFF sample layouts Pillow read to wrong pixels without a word: 16-bit premultiplied alpha (now
read), and 16-bit or uncompressed premultiplied separate colour planes (now refused in one line, as
are planes Pillow cannot identify)."""

from __future__ import annotations

import io
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from tune_cells.data.images import decode_full, decode_image, decode_images, open_image
from tune_cells.errors import UserInputError

STRAIGHT, PREMULTIPLIED = 2, 1  # ExtraSamples: unassociated, associated alpha


def tiff(samples: np.ndarray, alpha: int | None = None, planes: bool = False, order: str = "<",
         deflate: bool = False) -> bytes:
    """An RGB(A) TIFF (Pillow writes neither 16-bit colour nor planes) of H×W×C uint8 or uint16
    samples, one strip per plane: interleaved, or separate planes (PlanarConfiguration 2); C 4: the
    fourth is alpha of kind `alpha` (ExtraSamples). Little- or big-endian, raw or deflated (libtiff's)."""
    height, width, channels = samples.shape
    stored = samples.astype(f"{order}u{samples.itemsize}")
    strips = [stored[..., c].tobytes() for c in range(channels)] if planes else [stored.tobytes()]
    strips = [zlib.compress(strip) if deflate else strip for strip in strips]
    tags = {256: (3, [width]), 257: (3, [height]), 258: (3, [samples.itemsize * 8] * channels),
            259: (3, [8 if deflate else 1]), 262: (3, [2]), 273: (4, [0] * len(strips)), 277: (3, [channels]),
            278: (3, [height]), 279: (4, [len(s) for s in strips]), 284: (3, [2 if planes else 1]),
            **({338: (3, [alpha])} if alpha is not None else {})}
    packed = {tag: struct.pack(f"{order}{len(values)}{'H' if kind == 3 else 'I'}", *values)
              for tag, (kind, values) in tags.items()}
    after_ifd = 8 + 2 + 12 * len(tags) + 4
    arrays = {tag: value for tag, value in packed.items() if len(value) > 4}  # stored after the IFD
    data_at = after_ifd + sum(len(value) for value in arrays.values())
    starts = np.cumsum([data_at] + [len(s) for s in strips])[:-1].tolist()
    packed[273] = struct.pack(f"{order}{len(starts)}I", *starts)
    arrays = {tag: packed[tag] for tag in arrays}
    entries, offset = b"", after_ifd
    for tag in sorted(tags):
        kind, values = tags[tag]
        if tag in arrays:
            entries += struct.pack(f"{order}HHII", tag, kind, len(values), offset)
            offset += len(arrays[tag])
        else:
            entries += struct.pack(f"{order}HHI", tag, kind, len(values)) + packed[tag].ljust(4, b"\0")
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(f"{order}I", 8)
    return (header + struct.pack(f"{order}H", len(tags)) + entries + struct.pack(f"{order}I", 0)
            + b"".join(arrays[tag] for tag in sorted(arrays)) + b"".join(strips))


def twelve_bit_rgba(height: int = 6, width: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Random 12-bit colour under alpha rising from 0 to 1 across the columns; the first pixel opaque
    and the brightest (4095), so the image's maximum is known."""
    rng = np.random.default_rng(5)
    colour = rng.integers(0, 4096, (height, width, 3)).astype(np.uint16)
    alpha = np.tile(np.linspace(0, 65535, width), (height, 1)).round().astype(np.uint16)
    colour[0, 0], alpha[0, 0] = 4095, 65535
    return colour, alpha


def premultiply(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    top = np.iinfo(alpha.dtype).max
    return np.rint(colour.astype(np.float64) * alpha[..., None] / top).astype(colour.dtype)


@pytest.mark.parametrize("order, deflate", [("<", False), (">", True)])
def test_16_bit_premultiplied_alpha_reads_as_its_straight_twin(order, deflate):
    """Pillow divided the high bytes alone by alpha and kept them: 12-bit colour came out nearly black
    (off by up to 240 of 255) and unscaled. Now the full samples are divided by alpha, then read as a
    16-bit image with straight alpha: rescaled by its maximum, composited onto white."""
    colour, alpha = twelve_bit_rgba()
    stored = np.dstack([premultiply(colour, alpha), alpha])
    got = decode_full(io.BytesIO(tiff(stored, PREMULTIPLIED, order=order, deflate=deflate))).astype(int)
    twin = decode_full(io.BytesIO(tiff(np.dstack([colour, alpha]), STRAIGHT, order=order, deflate=deflate)))
    assert np.abs(got - twin).max() <= 1
    shown = (alpha >> 8)[..., None] / 255  # the alpha `load` keeps: its high byte
    expected = colour / 4095 * 255 * shown + 255 * (1 - shown)  # C + (1 - a) * white, C rescaled
    assert np.abs(got - expected).max() <= 1.5
    assert (got[:, 0] == 255).all() and (got[0, 0] == 255).all()  # transparent column white; the brightest


def test_a_nearly_transparent_pixel_does_not_set_the_maximum():
    """Premultiplied 1 under alpha 1 of 65535 divides to 65535, the brightest colour there is; it
    would darken the whole image 16-fold. A pixel under one 8-bit step of alpha shows the background."""
    colour, alpha = twelve_bit_rgba()
    stored = np.dstack([premultiply(colour, alpha), alpha])
    clean = decode_full(io.BytesIO(tiff(stored, PREMULTIPLIED)))
    stored[3, 0] = (1, 1, 1, 1)
    assert np.array_equal(decode_full(io.BytesIO(tiff(stored, PREMULTIPLIED))), clean)


@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
@pytest.mark.parametrize("alpha", [None, STRAIGHT, PREMULTIPLIED], ids=["rgb", "straight", "premultiplied"])
def test_16_bit_separate_planes_are_refused_in_one_line_naming_the_file(tmp_path, deflate, alpha):
    """Raw, Pillow read each 16-bit plane as 8-bit (garbage, or a ValueError); through libtiff it kept
    each sample's high byte, with no way to the low one (12-bit colour off by up to 16 of 255)."""
    from mlflow.exceptions import MlflowException

    from tune_cells.data.image_refusals import SeparatePlanesTiff
    from tune_cells.predict import decode_files
    from tune_cells.pyfunc import _row_errors

    colour, opacity = twelve_bit_rgba()
    samples = colour if alpha is None else np.dstack([colour, opacity])
    data = tiff(samples, alpha, planes=True, deflate=deflate)
    (tmp_path / "planes.tif").write_bytes(data)
    said = ("a 16-bit TIFF of separate colour planes (PlanarConfiguration 2), not read: save it with interleaved "
            "samples (PlanarConfiguration 1), as most programs write TIFF")
    with pytest.raises(SeparatePlanesTiff) as refused:
        decode_image(tmp_path / "planes.tif", 3, 16)
    assert str(refused.value) == said
    with pytest.raises(UserInputError, match=r"cannot decode planes\.tif: a 16-bit TIFF of separate colour planes"):  # a search's
        decode_images(tmp_path, ["planes.tif"], 3, 16)
    with pytest.raises(UserInputError, match=r"planes\.tif: a 16-bit TIFF of separate colour planes"):  # predict's
        decode_files(SimpleNamespace(decode_path=lambda path: decode_image(path, 3, 16)), [tmp_path / "planes.tif"])
    with pytest.raises(MlflowException) as served:  # a served row's 400
        with _row_errors(0, "image"):
            open_image(io.BytesIO(data))
    assert served.value.message == f"row 0 (image): {said}"


@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
@pytest.mark.parametrize("alpha", [None, STRAIGHT, PREMULTIPLIED], ids=["rgb", "straight", "premultiplied"])
def test_8_bit_separate_planes_read_as_interleaved_ones_or_are_refused(deflate, alpha):
    """8-bit planes read right, but for uncompressed premultiplied alpha: Pillow has no decoder for
    that plane (it raised a bare ValueError); now refused by name."""
    from tune_cells.data.image_refusals import SeparatePlanesTiff

    rng = np.random.default_rng(2)
    samples = rng.integers(0, 256, (6, 40, 3 if alpha is None else 4)).astype(np.uint8)
    if alpha == PREMULTIPLIED:
        samples[..., :3] = premultiply(samples[..., :3], samples[..., 3])
    planes = io.BytesIO(tiff(samples, alpha, planes=True, deflate=deflate))
    if alpha == PREMULTIPLIED and not deflate:
        with pytest.raises(SeparatePlanesTiff, match=r"^an uncompressed TIFF of separate colour planes .* with "
                                                     r"premultiplied alpha, not read: save it with interleaved"):
            decode_full(planes)
        return
    interleaved = decode_full(io.BytesIO(tiff(samples, alpha, deflate=deflate)))
    assert np.array_equal(decode_full(planes), interleaved)


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_planes_pillow_cannot_identify_are_named_not_called_no_image(tmp_path, order):
    """An uncompressed 8-bit TIFF of separate planes with an unspecified extra sample (ExtraSamples 0):
    Pillow cannot identify it at all, which read as "not a readable image"; its header says why."""
    from PIL import UnidentifiedImageError

    from tune_cells.data.image_refusals import SeparatePlanesTiff

    samples = np.random.default_rng(3).integers(0, 256, (6, 40, 4)).astype(np.uint8)
    data = tiff(samples, 0, planes=True, order=order)
    (tmp_path / "planes.tif").write_bytes(data)
    said = r"^a TIFF of separate colour planes \(PlanarConfiguration 2\) in a layout Pillow cannot read"
    for source in (tmp_path / "planes.tif", io.BytesIO(data)):
        with pytest.raises(SeparatePlanesTiff, match=said):
            open_image(source)
    with pytest.raises(UserInputError, match=r"cannot decode planes\.tif: a TIFF of separate colour planes \(PlanarConfiguration 2\) in a layout"):  # a search's
        decode_images(tmp_path, ["planes.tif"], 3, 16)
    interleaved = io.BytesIO(tiff(samples, 0, order=order))  # the same samples interleaved: read
    assert open_image(interleaved).size == (40, 6)
    for other in (data[:4] + b"\xff" * 4, b"II*\x00", b"not an image at all"):  # unidentified, nothing to name
        with pytest.raises(UnidentifiedImageError):
            open_image(io.BytesIO(other))
