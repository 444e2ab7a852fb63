"""Image index (what a dataset holds) and decoding to fixed-size uint8 arrays."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tune_cells.data.deep_colour import refuse_misread_planes, refuse_unidentified_planes, sixteen_bit_samples
from tune_cells.data.image_refusals import ImageRefused as ImageRefused  # where callers import it from
from tune_cells.data.image_refusals import ImageTooLarge, MultiPageTiff
from tune_cells.errors import UserInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # Pillow's decoders for those suffixes; no other is tried
# Largest image decoded, read from the header first: every task's images fit (lung fields are
# 1392x1040, 1.4 MP), and a compressed "decompression bomb" of 13k x 13k is refused unread.
MAX_IMAGE_PIXELS = 40_000_000
ORIENTATION = ExifTags.Base.Orientation  # EXIF's and TIFF's tag 274: 1 upright, 2-8 flipped or turned


def open_image(source: Path | BinaryIO) -> Image.Image:
    """A lazily opened image (a file or a file object) of a known format within MAX_IMAGE_PIXELS
    and of one page, its colour planes readable; nothing is decoded yet. Raises what Pillow raises for a non-image
    (DECODE_ERRORS) and ImageRefused (a ValueError) for an image refused from its header."""
    limit = f"over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
    try:
        image = Image.open(source, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own header check, at twice its MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"image {limit}") from None
    except UnidentifiedImageError:
        refuse_unidentified_planes(source)  # SeparatePlanesTiff, named, where Pillow can only say "not an image"
        raise
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageTooLarge(f"{width}x{height} pixels, {limit}")
    try:
        pages = image.n_frames if image.format == "TIFF" else 1
        several = pages > 1 and not _later_pages_reduced(image)
        refuse_misread_planes(image)  # SeparatePlanesTiff: planes Pillow would decode to wrong pixels, silently
    except DECODE_ERRORS:  # a broken chain of pages; a refusal
        image.close()
        raise
    if several:
        image.close()  # Pillow would read the first page alone, silently
        raise MultiPageTiff(f"a TIFF of {pages} pages (a stack or a series): save the page to use on its own")
    return image


def _later_pages_reduced(tiff: Image.Image) -> bool:
    """Whether every page after the first is marked a reduced-resolution copy (NewSubfileType bit
    0: a pyramid's levels, a thumbnail), so that the first page is the image."""
    try:
        return all(tiff.seek(page) or tiff.tag_v2.get(254, 0) & 1 for page in range(1, tiff.n_frames))
    finally:
        tiff.seek(0)


@dataclass
class ImageIndex:
    """The images of a dataset and their labels; pixels are decoded only on demand.

    `items` has columns `path` (relative to `root`, POSIX) and `label` (int index into
    `classes`), optionally `split` when the dataset's own layout fixes the split, and optionally
    `group` when it names related images (one animal, patient, specimen: they share a part).
    """

    root: Path
    items: pd.DataFrame
    classes: list[str]  # class names; for segmentation, the target (mask) names
    source: str = "user"  # "user" or "demo"
    kind: str = "classification"  # or "segmentation": column `mask:<target>` holds each mask's path
    group_source: str = ""  # where the `group` column came from, for the log ("" without one)

    def __post_init__(self):
        self.items = checked_paths(Path(self.root), self.items)

    def mask_paths(self, target: str) -> list[str]:
        return list(self.items[f"mask:{target}"])

    def files_of(self, paths: list[str]) -> set[str]:
        """The files of these images: the images and, for segmentation, their masks."""
        rows = self.items["path"].isin(set(paths))
        files = set(self.items.loc[rows, "path"])
        for column in (c for c in self.items.columns if c.startswith("mask:")):
            files.update(self.items.loc[rows, column])
        return files

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of file names, sizes and labels: names the split file of this dataset."""
        digest = hashlib.sha256()
        for path, label in zip(self.items["path"], self.items["label"]):
            size = (self.root / path).stat().st_size
            digest.update(f"{path}\t{size}\t{label}\n".encode())
        for column in (c for c in self.items.columns if c.startswith("mask:")):  # segmentation masks
            for path in self.items[column]:
                digest.update(f"{path}\t{(self.root / path).stat().st_size}\n".encode())
        digest.update("\t".join(self.classes).encode())
        return digest.hexdigest()[:12]

    def class_counts(self) -> dict[str, int]:
        counts = self.items["label"].value_counts()
        return {name: int(counts.get(i, 0)) for i, name in enumerate(self.classes)}


def checked_paths(root: Path, items: pd.DataFrame) -> pd.DataFrame:
    """`items` with every image and mask path normalised (POSIX, no `.` parts), after checking that
    each resolves inside `root` (a `../` in a label CSV or a symlink must not read other files) and
    that no image is listed twice under two spellings (`1.png`, `./1.png`: it would count twice
    and could sit in two split parts). Both are exit 2, naming the path."""
    inside = root.resolve()
    items = items.copy()
    for column in [c for c in items.columns if c == "path" or c.startswith("mask:")]:
        spelled = [str(p) for p in items[column]]
        normal = [PurePosixPath(p).as_posix() for p in spelled]
        resolved = [(root / p).resolve() for p in normal]
        for given, target in zip(spelled, resolved):
            if not target.is_relative_to(inside):
                raise UserInputError(f"{root}: {given} resolves outside the data folder (to {target})")
        if column == "path":
            first: dict[Path, str] = {}
            for given, target in zip(spelled, resolved):
                if target in first:
                    raise UserInputError(f"{root}: one image listed twice, as {first[target]} and {given}")
                first[target] = given
        items[column] = normal
    return items


def decode_image(path: Path | BinaryIO, channels: int, size: int) -> np.ndarray:
    """Decode one image to an HxWxC uint8 array of `size`x`size` (C = `channels`).

    Raises OSError/UnidentifiedImageError/ValueError for files that are not images.
    """
    with open_image(path) as image:
        return store_array(load(image, path), channels, size)


def load(image: Image.Image, source: Path | BinaryIO) -> Image.Image:
    """`image`, just opened from `source`, decoded as every path decodes it (training, predict,
    serve): 16-bit colour at full depth, its colour rescaled by its maximum as `eight_bit` does
    16-bit grey (Pillow keeps only the high bytes), its alpha kept; turned upright by its EXIF
    orientation, as viewers show it (a camera's JPEG; a lung mask by its own tag, as its image)."""
    if image.format == "TIFF" and image.tag_v2.get(ORIENTATION) in (5, 6, 7, 8):
        image.filename = ""  # Pillow would memory-map an uncompressed raster at its turned size: garbled
    samples = sixteen_bit_samples(image, source)
    image.load()
    if samples is not None:
        orientation = image.getexif().get(ORIENTATION, 1)
        colour = _rescaled_to_uint8(samples[..., :3])
        alpha = [(samples[..., 3] >> 8).astype(np.uint8)] if samples.shape[-1] == 4 else []
        image = Image.fromarray(np.dstack([colour, *alpha]), "RGBA" if alpha else "RGB")
        image.getexif()[ORIENTATION] = orientation  # the file's, turned below as any image's
    ImageOps.exif_transpose(image, in_place=True)  # a TIFF Pillow turns itself, on loading
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size `load` gives an opened image, from its header (a PNG's EXIF after its pixels is not
    read: Pillow's PNG getexif decodes the image to find it). A TIFF's size is already upright."""
    if image.format == "TIFF":
        return image.size
    turned = Image.Image.getexif(image).get(ORIENTATION, 1) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else image.size


def store_array(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """A loaded image as the classification store keeps it: `size`x`size`x`channels` uint8."""
    image = opaque(eight_bit(image), WHITE).convert("RGB" if channels == 3 else "L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit microscopy (Pillow modes I;16, I and F, e.g. 0-1 floats) rescaled to 8 bit
    by its maximum, negatives as 0; Pillow's own conversion would clip every value above 255 to
    white (and floats below 1 to black). Other modes as they are (16-bit colour: `load`)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_rescaled_to_uint8(np.asarray(image)))
    return image


WHITE, BLACK = 255, 0  # what a transparent pixel shows: in an image white, as viewers show it; in a mask no target


def opaque(image: Image.Image, background: int) -> Image.Image:
    """A translucent image (an alpha channel, or a transparent colour of a palette, grey or RGB
    image) composited onto `background` as RGB; other images as they are. The colour under a fully
    transparent pixel is whatever the writer left there (often black, or the colour it erased)."""
    if image.mode not in ("RGBA", "RGBa", "LA", "La", "PA") and "transparency" not in image.info:
        return image
    under = Image.new("RGBA", image.size, (background, background, background, 255))
    return Image.alpha_composite(under, image.convert("RGBA")).convert("RGB")


def _rescaled_to_uint8(array: np.ndarray, rows: int = 512) -> np.ndarray:
    """`array / max * 255` as uint8 (negatives 0), in float32 a band of rows at a time (never the whole image).
    A float image with no finite value (all NaN) has nothing to learn or predict from: refused."""
    if array.dtype.kind == "f" and array.size and not any(np.isfinite(array[start : start + rows]).any()
                                           for start in range(0, len(array), rows)):  # (stops at the first finite band)
        raise ImageRefused("no finite pixel value, all NaN or infinite")
    top = float(np.nanmax(array)) if array.size else 0.0
    top = top if top > 0 and np.isfinite(top) else 1.0
    out = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, len(array), rows):
        band = np.nan_to_num(array[start : start + rows].astype(np.float32) / top * 255, nan=0.0, posinf=255.0)
        out[start : start + rows] = np.clip(band, 0, 255).astype(np.uint8)
    return out


def decode_full(path: Path | BinaryIO, scale: float = 1.0) -> np.ndarray:
    """An RGB image at its own size times `scale` (segmentation keeps the geometry), H×W×3 uint8."""
    with open_image(path) as image:
        return full_array(load(image, path), scale)


def full_array(image: Image.Image, scale: float = 1.0) -> np.ndarray:
    image = opaque(eight_bit(image), WHITE).convert("RGB")
    if scale != 1.0:
        image = image.resize(scaled_size(image.size, scale), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


MASK_THRESHOLD = 127  # masks may be lossy JPEG: grey values above this are foreground


def decode_mask(path: Path, scale: float = 1.0) -> np.ndarray:
    """A binary mask (H×W uint8 0/1) at its own size times `scale` (read as `mask_array` says)."""
    with open_image(path) as image:
        return mask_array(load(image, path), scale)


def mask_array(image: Image.Image, scale: float = 1.0) -> np.ndarray:
    """A binary mask: white (> 127) is the target; a lossless mask of exactly two levels {0, v}
    (0/1 values, a palette's indices, a dark colour) marks the target with v. A lossy (JPEG) mask
    is only thresholded: its compression noise would otherwise pass for a second level. Transparent
    pixels are background."""
    lossless = image.format != "JPEG"
    image = opaque(eight_bit(image), BLACK).convert("L")  # a mask drawn on a transparent layer: the layer is no target
    if lossless:
        grey = np.asarray(image)
        top = int(grey.max())
        if 0 < top <= MASK_THRESHOLD and not np.any((grey != 0) & (grey != top)):
            image = Image.fromarray(np.where(grey == top, 255, 0).astype(np.uint8))
    if scale != 1.0:
        image = image.resize(scaled_size(image.size, scale), Image.Resampling.BILINEAR, reducing_gap=None)
    return (np.asarray(image) > MASK_THRESHOLD).astype(np.uint8)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def decode_images(root: Path, paths: list[str], channels: int, size: int) -> np.ndarray:
    """Decode many images into one (N, size, size, C) uint8 array; undecodable files are exit 2."""
    arrays = _for_each_image(root, paths, lambda image, rel: store_array(image, channels, size), "decoding images")
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, array in enumerate(arrays):
        out[i] = array
    return out


# What Pillow raises for a file that is not a readable image (empty, truncated, text, ...).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


_DECODING_CANCELLED = threading.Event()


class DecodingCancelled(Exception):
    """A decoding pass stopped by `cancel_decoding` (the search it served was interrupted)."""


def cancel_decoding() -> None:
    """Make decoding passes running in other threads skip every image they have not started and
    raise DecodingCancelled: a search interrupted during its preflight (Ctrl-C while Ray starts)
    stops in moments, not after the whole dataset, and opens no store. `allow_decoding` undoes it."""
    _DECODING_CANCELLED.set()


def allow_decoding() -> None:
    _DECODING_CANCELLED.clear()


def _for_each_image(root: Path, paths: list[str], work: Callable[[Image.Image, str], object], what: str) -> list:
    """`work(loaded image, path)` for every path, in order, a thread per core (Pillow decodes and
    resizes without the GIL). Files that do not decode are exit 2, the first three named."""
    def one(rel: str):
        if _DECODING_CANCELLED.is_set():
            raise DecodingCancelled(rel)
        try:
            with open_image(root / rel) as image:
                return work(load(image, root / rel), rel), None
        except ImageRefused as exc:  # its own reason (no finite value, too many pixels)
            return None, f"{rel}: {exc}"
        except DECODE_ERRORS as exc:
            return None, f"{rel} ({type(exc).__name__})"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        try:
            results = list(_progress(pool.map(one, paths, chunksize=32), what, total=len(paths)))
        except BaseException:  # Ctrl-C in this thread: the pool's exit would otherwise decode every queued image
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bad = [error for _, error in results if error is not None]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserInputError(f"{root}: cannot decode {'; '.join(bad[:3])}{more}")
    return [value for value, _ in results]


def _progress(items, what: str, total: int | None = None):
    """A progress bar on a terminal for long loops over many images; silent in logs and tests."""
    import sys

    if (total if total is not None else len(items)) < 1000 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="img", leave=False, total=total)


# Difference hash (dHash) on a 17x16 grey thumbnail: 256 bits that survive recompression, small
# colour shifts and rescaling, so near-identical copies of one image land within a few bits.
HASH_SIZE = 16
NEAR_DUPLICATE_BITS = 12  # of 256: near-identical; similar-looking cells (HEp-2) differ by more


def image_hashes(root: Path, paths: list[str]) -> np.ndarray:
    """(N, 4) uint64 dHashes of every image; any file that does not decode is exit 2, named."""
    return scan_images(root, paths).hashes


@dataclass
class ImageScan:
    hashes: np.ndarray  # (N, 4) uint64 dHash per path
    kept: dict[str, np.ndarray]  # converted pixels of the paths asked for, by path


def scan_images(root: Path, paths: list[str], keep: frozenset[str] = frozenset(),
                convert: Callable[[Image.Image], np.ndarray] | None = None) -> ImageScan:
    """Decode every image once: hash it, and keep `convert(image)` for the paths in `keep`.

    This is the preflight's check that every file decodes, and also the decoding that training
    uses (so a search decodes each image once, not twice). Any file that does not decode is
    exit 2, named.
    """
    def hash_and_keep(image: Image.Image, rel: str):
        grey = np.asarray(image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR),
                          dtype=np.int16)
        bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
        pixels = convert(image) if convert is not None and rel in keep else None
        return np.packbits(bits).view(">u8").astype(np.uint64), pixels

    results = _for_each_image(root, paths, hash_and_keep, "checking images")
    hashes = np.zeros((len(paths), HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)
    for i, (digest, _) in enumerate(results):
        hashes[i] = digest
    return ImageScan(hashes, {rel: pixels for rel, (_, pixels) in zip(paths, results) if pixels is not None})


def near_duplicates(hashes_a: np.ndarray, hashes_b: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS,
                    upper: bool = False):
    """Index pairs (i in a, j in b, differing bits) whose hashes differ in at most `max_bits`.
    `upper` (a and b the same hashes): only pairs with i < j, each pair once."""
    pairs = []
    for start in range(0, len(hashes_a), 256):  # blocks keep the distance matrix small
        block = hashes_a[start : start + 256]
        first = start if upper else 0
        others = hashes_b[first:]
        distance = np.zeros((len(block), len(others)), dtype=np.uint16)
        for word in range(hashes_a.shape[1]):  # a word at a time: 4x faster than one 3-D array
            distance += np.bitwise_count(block[:, word, None] ^ others[None, :, word])
        for i, j in zip(*np.nonzero(distance <= max_bits)):
            if not upper or start + i < first + j:
                pairs.append((start + int(i), first + int(j), int(distance[i, j])))
    return pairs
