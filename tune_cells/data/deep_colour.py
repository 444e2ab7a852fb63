"""16-bit colour images (PNG, TIFF; and 16-bit grey PNG with alpha) read at full depth: Pillow has
no 16-bit colour mode and keeps only the high byte of each sample, so 12-bit data stored in 16 bits
came out dark. Also the TIFF layouts Pillow would decode to wrong pixels without a word: 16-bit
premultiplied alpha (read here), and some separate colour planes (refused from the header, also
where Pillow cannot identify them)."""

from __future__ import annotations

import os
import struct
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, TiffImagePlugin

from tune_cells.data.image_refusals import SeparatePlanesTiff

# The byte order that decodes each sample's other (low) byte. Libtiff hands samples over in the
# machine's order (Pillow's ";16N").
_OTHER_BYTE = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if sys.byteorder == "little" else ";16L"}
_COLOUR = ("RGB", "RGBA", "RGBX")
_PREMULTIPLIED = "RGBa"  # Pillow's rawmode of a TIFF's premultiplied (associated) alpha, ExtraSamples 1
BITS_PER_SAMPLE, COMPRESSION, SAMPLES_PER_PIXEL, PLANAR_CONFIGURATION, EXTRA_SAMPLES = 258, 259, 277, 284, 338


def refuse_misread_planes(image: Image.Image) -> None:
    """Raise SeparatePlanesTiff for a TIFF of separate colour planes (PlanarConfiguration 2) that Pillow
    reads wrong: of 16-bit samples (uncompressed, it reads each plane as 8-bit: garbage; through
    libtiff it gets each sample's high byte only, and no second decoding gets the low one, as
    `sixteen_bit_samples` does for interleaved samples), or uncompressed with premultiplied alpha (it
    has no decoder for that plane). Other 8-bit planes read right (compressed premultiplied ones too:
    libtiff's planes are divided by their alpha as interleaved samples are)."""
    tags = image.tag_v2 if image.format == "TIFF" else {}
    if tags.get(PLANAR_CONFIGURATION, 1) != 2 or tags.get(SAMPLES_PER_PIXEL, 1) < 2:
        return
    bits = max(tags.get(BITS_PER_SAMPLE, (1,)))  # Pillow gives both tags as tuples, one value a sample
    save = "save it with interleaved samples (PlanarConfiguration 1), as most programs write TIFF"
    if bits > 8:
        raise SeparatePlanesTiff(f"a {bits}-bit TIFF of separate colour planes (PlanarConfiguration 2), not read: {save}")
    if 1 in tags.get(EXTRA_SAMPLES, ()) and tags.get(COMPRESSION, 1) == 1:  # ExtraSamples 1: premultiplied alpha
        raise SeparatePlanesTiff("an uncompressed TIFF of separate colour planes (PlanarConfiguration 2) with "
                                 f"premultiplied alpha, not read: {save}")


def refuse_unidentified_planes(source: Path | BinaryIO) -> None:
    """Raise SeparatePlanesTiff for a TIFF that Pillow could not identify whose first page stores
    separate colour planes (PlanarConfiguration 2): Pillow has no unpacker for some of them (an
    uncompressed 8-bit one with an unspecified extra sample), and "not a readable image" would not
    say what to change. Reads the first page's tags with Pillow's own TIFF tag reader; returns for
    anything else."""
    try:
        with open(source, "rb") if isinstance(source, (str, os.PathLike)) else nullcontext(source) as stream:
            stream.seek(0)
            header = stream.read(8)
            header += stream.read(8) if header[2:3] == b"+" else b""  # BigTIFF's header is 16 bytes
            tags = TiffImagePlugin.ImageFileDirectory_v2(header)
            stream.seek(tags.next)
            tags.load(stream)
    except (SyntaxError, OSError, ValueError, EOFError, struct.error):  # no TIFF tags: nothing to name
        return
    if tags.get(PLANAR_CONFIGURATION) == 2:
        raise SeparatePlanesTiff("a TIFF of separate colour planes (PlanarConfiguration 2) in a layout Pillow "
                                 "cannot read (its extra samples): save it with interleaved samples "
                                 "(PlanarConfiguration 1), as most programs write TIFF")


def _rawmode(tile: Image.ImageFile._Tile) -> str:
    return tile.args if isinstance(tile.args, str) else tile.args[0]


def _with_rawmode(tile: Image.ImageFile._Tile, rawmode: str) -> Image.ImageFile._Tile:
    return tile._replace(args=rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:]))


def sixteen_bit_samples(image: Image.Image, source: Path | BinaryIO) -> np.ndarray | None:
    """The H×W×C uint16 samples (RGB or RGBA, straight alpha) of a 16-bit colour image, or of a 16-bit
    grey PNG with alpha, just opened from `source` (loaded on the way); None, nothing decoded, for any
    other image. Pillow's own decoding gives the high bytes; a second decoding of `source` that reads
    each sample in the other byte order gives the low ones (the decoders, PNG's filters included,
    run unchanged: only the unpacking differs)."""
    rawmodes = {_rawmode(tile) for tile in image.tile}
    if rawmodes == {"LA;16B"}:  # Pillow decodes it into RGBA; unpacked as RGBA, each byte is a channel
        image.tile = [_with_rawmode(tile, "RGBA") for tile in image.tile]
        image.load()
        raw = np.asarray(image).astype(np.uint16)
        grey, alpha = (raw[..., 0] << 8) | raw[..., 1], (raw[..., 2] << 8) | raw[..., 3]
        return np.dstack([grey, grey, grey, alpha])
    base, _, depth = rawmodes.pop().partition(";") if len(rawmodes) == 1 else ("", "", "")
    premultiplied = base == _PREMULTIPLIED and f";{depth}" in _OTHER_BYTE  # 8-bit: Pillow divides it right
    if premultiplied:  # the samples as stored: Pillow's RGBa unpacker would divide their high bytes alone
        base = "RGBA"
        image.tile = [_with_rawmode(tile, f"{base};{depth}") for tile in image.tile]
    if base not in _COLOUR or f";{depth}" not in _OTHER_BYTE:
        return None
    other = base + _OTHER_BYTE[f";{depth}"]
    image.load()
    high = np.asarray(image)
    with Image.open(source, formats=[image.format]) as again:  # a file object: Image.open reads from its start
        again.tile = [_with_rawmode(tile, other) for tile in again.tile]
        again.load()
        low = np.asarray(again)
    samples = (high.astype(np.uint16) << 8) | low
    return _unpremultiplied(samples) if premultiplied else samples


def _unpremultiplied(samples: np.ndarray, rows: int = 512) -> np.ndarray:
    """Straight colour C = P / alpha from premultiplied RGBA samples, in place, a band of rows at a
    time. Where alpha is under 256 (`load` keeps its high byte: 0, the pixel shows the background
    alone) the colour is 0: P / alpha of a rounded P and a tiny alpha would make up a bright colour,
    and that would set the maximum that rescales the whole image."""
    for start in range(0, len(samples), rows):
        band = samples[start : start + rows]
        alpha = band[..., 3:].astype(np.float32)
        straight = np.where(alpha >= 256, band[..., :3] * (65535 / np.maximum(alpha, 1)), 0)
        band[..., :3] = np.clip(np.rint(straight), 0, 65535).astype(np.uint16)
    return samples
