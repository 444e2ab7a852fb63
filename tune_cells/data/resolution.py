"""The square size a classification dataset is decoded to: its native size, within the task's bounds.

Decoded images stay in memory (and in Ray's object store) for a whole search, so the size is capped;
the trial's `image_size` then resizes each batch, identically in training and every prediction path
(the model's spec records the decode size it was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune_cells.data.images import DECODE_ERRORS, open_image

# Headers read to measure a dataset: an even spread of this many gives a stable median in well under
# a second, however large the dataset.
NATIVE_SAMPLE = 512


@dataclass(frozen=True)
class StoreSize:
    size: int  # decoded side in pixels (0: each image keeps its own size, segmentation)
    reason: str  # why, for the preflight's log line and the search run's parameters


def native_side(root: Path, paths: list[str], sample: int = NATIVE_SAMPLE) -> tuple[int, int]:
    """(median longer side, images measured) over up to `sample` images spread evenly over `paths`,
    from their headers only; (0, 0) when none opens (the full decoding then names the bad files)."""
    picked = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(sample, len(paths))).round()}) if paths else []
    sides = []
    for i in picked:
        try:
            with open_image(root / paths[i]) as image:
                sides.append(max(image.size))
        except DECODE_ERRORS:
            continue
    return (round(float(np.median(sides))), len(sides)) if sides else (0, 0)


def clamp_store_size(native: int, smallest: int, largest: int) -> int:
    """`native` within [smallest, largest]; a cap below the floor wins (it is the memory limit)."""
    return min(largest, max(smallest, native))


def choose_store_size(root: Path, paths: list[str], smallest: int, largest: int,
                      sample: int = NATIVE_SAMPLE, cap: str = "max store size") -> StoreSize:
    """The decode size of a dataset: its native size clamped to [smallest, largest]; `largest` 0
    (no native sizing): `smallest`, fixed."""
    if largest <= 0:
        return StoreSize(smallest, "each image's own size" if smallest == 0 else f"the task's fixed size {smallest} px")
    native, measured = native_side(root, paths, sample)
    if measured == 0:
        return StoreSize(clamp_store_size(smallest, smallest, largest), "no image header could be read")
    size = clamp_store_size(native, smallest, largest)
    found = f"native {native} px (median longer side of {measured} images)"
    if native > size:
        return StoreSize(size, f"{found}, capped at {largest} px ({cap})")
    if native < size:
        capped = f", capped at {largest} px" if size < smallest else ""
        return StoreSize(size, f"{found}, enlarged to the task's smallest store size {smallest} px{capped}")
    return StoreSize(size, found)


def decoded_bytes(images: int, size: int, channels: int) -> int:
    """Memory of `images` decoded uint8 arrays of `size`x`size`x`channels`."""
    return images * size * size * channels
