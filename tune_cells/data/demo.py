"""Deterministic demo data: small H&E-like nucleus patches in the nuclei task's Kaggle layout.

The four classes differ the way the real ones do (size, shape, chromatin texture, nucleoli,
surrounding tissue), while per-image stain variation and neighbouring nuclei of random classes
make colour alone a poor cue: a classifier must look at shape and texture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
PATCH = 100
# Class order of the nuclei task: 0 normal epithelial, 1 cancer epithelial, 2 muscle, 3 immune.
DEFAULT_COUNTS = (90, 200, 80, 150)

# Optical-density vectors of haematoxylin and eosin (Ruifrok & Johnston), RGB order.
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class NucleusLook:
    radius: tuple[float, float]  # mean, sd of the minor radius in pixels
    aspect: tuple[float, float]  # range of major/minor
    irregularity: float  # amplitude of boundary wobble
    density: tuple[float, float]  # haematoxylin concentration range
    texture_scale: float  # chromatin clump size (px)
    texture_amount: float
    nucleoli: tuple[int, int]  # range of dark nucleoli
    eosin: float  # extra eosin in the surrounding tissue
    streaks: float  # fibre streaks along the nucleus (muscle)


LOOKS = (
    NucleusLook((10.0, 1.6), (1.0, 1.5), 0.05, (0.55, 0.85), 1.0, 0.20, (0, 0), 0.0, 0.0),
    NucleusLook((13.0, 2.4), (1.0, 1.7), 0.10, (0.60, 1.00), 2.6, 0.55, (1, 3), 0.0, 0.0),
    NucleusLook((5.5, 1.0), (2.6, 4.5), 0.04, (0.60, 0.95), 1.0, 0.20, (0, 0), 0.25, 0.6),
    NucleusLook((7.0, 1.1), (1.0, 1.25), 0.03, (0.95, 1.35), 0.8, 0.10, (0, 0), 0.0, 0.0),
)


def _nucleus(rng: np.random.Generator, look: NucleusLook, cy: float, cx: float, yy, xx):
    """Haematoxylin concentration of one nucleus centred at (cy, cx)."""
    minor = max(2.5, rng.normal(*look.radius))
    major = minor * rng.uniform(*look.aspect)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    angle = np.arctan2(v, u)
    wobble = 1.0
    for k in (2, 3, 4):
        wobble = wobble + look.irregularity * rng.normal() * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    r = np.sqrt((u / major) ** 2 + (v / minor) ** 2) / np.maximum(wobble, 0.5)
    mask = 1.0 / (1.0 + np.exp((r - 1.0) * 12.0))  # soft edge
    texture = ndimage.gaussian_filter(rng.normal(size=yy.shape), look.texture_scale)
    texture /= texture.std() + 1e-6
    density = rng.uniform(*look.density) * (1.0 + look.texture_amount * texture)
    conc = mask * np.clip(density, 0.05, None)
    # Rim of condensed chromatin (nuclear membrane) is darker than the interior.
    conc += 0.25 * mask * np.clip(r, 0, 1) ** 4
    for _ in range(rng.integers(look.nucleoli[0], look.nucleoli[1] + 1)):
        ny, nx = rng.normal(0, 0.35 * minor, size=2)
        conc += 0.9 * np.exp(-((dy - ny) ** 2 + (dx - nx) ** 2) / (2 * rng.uniform(1.0, 1.8) ** 2))
    return conc, theta


def make_patch(rng: np.random.Generator, label: int) -> np.ndarray:
    yy, xx = np.mgrid[0:PATCH, 0:PATCH].astype(np.float64)
    look = LOOKS[label]
    eosin = 0.25 + 0.35 * ndimage.gaussian_filter(rng.random((PATCH, PATCH)), 6) + look.eosin
    hema = 0.05 * ndimage.gaussian_filter(rng.random((PATCH, PATCH)), 3)
    # Neighbouring nuclei of random classes, mostly near the border: clutter and overlap.
    for _ in range(rng.integers(0, 5)):
        other = LOOKS[rng.integers(0, 4)]
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(28, 50)
        conc, _ = _nucleus(rng, other, 50 + dist * np.sin(angle), 50 + dist * np.cos(angle), yy, xx)
        hema += conc
    cy, cx = 50 + rng.normal(0, 3, size=2)
    conc, theta = _nucleus(rng, look, cy, cx, yy, xx)
    hema += conc
    if look.streaks:
        along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        fibres = np.sin(across * rng.uniform(0.5, 0.9) + 0.02 * along) * 0.5 + 0.5
        eosin += look.streaks * 0.3 * fibres
    # Per-image stain variation (scanner, staining batch) swamps class colour differences.
    h_vec = HEMATOXYLIN * rng.uniform(0.75, 1.25, size=3)
    e_vec = EOSIN * rng.uniform(0.75, 1.25, size=3)
    h_scale, e_scale = rng.uniform(0.6, 1.5), rng.uniform(0.5, 1.6)
    od = h_scale * hema[..., None] * h_vec + e_scale * eosin[..., None] * e_vec
    rgb = 255.0 * np.exp(-od) * rng.uniform(0.85, 1.05)
    rgb = ndimage.gaussian_filter(rgb, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0,))
    rgb += rng.normal(0, rng.uniform(2, 8), size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def generate(root: Path, counts=DEFAULT_COUNTS, seed: int = 0) -> Path:
    """Write `train.csv` + `train/<n>.png` under `root` (once: an existing complete copy is kept)."""
    root = Path(root)
    stamp = root / ".demo.json"
    meta = {"generator": GENERATOR_VERSION, "counts": list(counts), "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return root
    if root.exists():
        shutil.rmtree(root)  # an old or interrupted demo copy: ours to replace
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, label) for label, n in enumerate(counts)])
    rng.shuffle(labels)
    rows = ["Filename,Label"]
    log.info("generating %d demo nucleus patches in %s", len(labels), root)
    for number, label in enumerate(labels, start=1):
        patch = make_patch(rng, int(label))
        Image.fromarray(patch).save(tmp / "train" / f"{number}.png", compress_level=1)
        rows.append(f"{number}.png,{label}")
    (tmp / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp / ".demo.json").write_text(json.dumps(meta))
    os.replace(tmp, root)
    return root
