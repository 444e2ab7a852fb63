"""16-bit colour images (PNG, TIFF; and 16-bit grey PNG with alpha) read at full depth: Pillow has
no 16-bit colour mode and keeps only the high byte of each sample, so 12-bit data stored in 16 bits
came out dark."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# The byte order that decodes each sample's other (low) byte. Libtiff hands samples over in the
# machine's order (Pillow's ";16N").
_OTHER_BYTE = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if sys.byteorder == "little" else ";16L"}
_COLOUR = ("RGB", "RGBA", "RGBX")  # premultiplied alpha (a TIFF's RGBa) is not read this way


def _rawmode(tile: Image.ImageFile._Tile) -> str:
    return tile.args if isinstance(tile.args, str) else tile.args[0]


def _with_rawmode(tile: Image.ImageFile._Tile, rawmode: str) -> Image.ImageFile._Tile:
    return tile._replace(args=rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:]))


def sixteen_bit_samples(image: Image.Image, source: Path | BinaryIO) -> np.ndarray | None:
    """The H×W×C uint16 samples (RGB or RGBA) of a 16-bit colour image, or of a 16-bit grey PNG
    with alpha, just opened from `source` (loaded on the way); None, nothing decoded, for any other
    image. Pillow's own decoding gives the high bytes; a second decoding of `source` that reads
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
    if base not in _COLOUR or f";{depth}" not in _OTHER_BYTE:
        return None
    other = base + _OTHER_BYTE[f";{depth}"]
    image.load()
    high = np.asarray(image)
    with Image.open(source, formats=[image.format]) as again:  # a file object: Image.open reads from its start
        again.tile = [_with_rawmode(tile, other) for tile in again.tile]
        again.load()
        low = np.asarray(again)
    return (high.astype(np.uint16) << 8) | low
