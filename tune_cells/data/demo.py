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


# ALL-IDB-like lymphocytes: 0 normal (small, dense, round), 1 lymphoblast (large, fine chromatin,
# nucleoli, slightly irregular). Same drawing code, other looks.
LEUKEMIA_LOOKS = (
    NucleusLook((10.0, 1.5), (1.0, 1.2), 0.03, (1.00, 1.35), 0.8, 0.12, (0, 0), 0.0, 0.0),
    NucleusLook((15.0, 2.2), (1.0, 1.35), 0.08, (0.65, 0.95), 1.2, 0.25, (1, 3), 0.0, 0.0),
)


def make_patch(rng: np.random.Generator, label: int, looks: tuple[NucleusLook, ...] = LOOKS) -> np.ndarray:
    yy, xx = np.mgrid[0:PATCH, 0:PATCH].astype(np.float64)
    look = looks[label]
    eosin = 0.25 + 0.35 * ndimage.gaussian_filter(rng.random((PATCH, PATCH)), 6) + look.eosin
    hema = 0.05 * ndimage.gaussian_filter(rng.random((PATCH, PATCH)), 3)
    # Neighbouring nuclei of random classes, mostly near the border: clutter and overlap.
    for _ in range(rng.integers(0, 5)):
        other = looks[rng.integers(0, len(looks))]
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


def _materialise(root: Path, meta: dict, write, staging: Path | None = None) -> Path:
    """Write a demo dataset once: `write(folder, rng)` fills a temporary folder that then replaces
    `root` in one rename; an existing copy made with the same settings is kept as it is. With
    `staging`, a missing or outdated copy is written there instead and `root` is left as it is (the
    search's preflight writes nothing; `place` moves it later). Returns the copy's folder."""
    root = Path(root)
    stamp = root / ".demo.json"
    meta = {"generator": GENERATOR_VERSION, **meta}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return root
    folder = Path(staging) if staging is not None else root.with_name(root.name + ".partial")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info("generating demo data for %s", root)
    write(folder, np.random.default_rng(meta.get("seed", 0)))
    (folder / ".demo.json").write_text(json.dumps(meta))
    if staging is not None:
        return folder
    if root.exists():
        shutil.rmtree(root)  # an old or interrupted demo copy: ours to replace
    os.replace(folder, root)
    return root


def place(staged: Path, root: Path) -> None:
    """A copy written in `staged` moved to `root`, replacing an old copy there (ours): by way of
    ROOT.partial, so that a move cut short (a copy, across file systems) is never taken for a copy."""
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staged, partial)
    if root.exists():
        shutil.rmtree(root)
    os.replace(partial, root)


def _shuffled_labels(rng: np.random.Generator, counts) -> np.ndarray:
    labels = np.concatenate([np.full(n, label) for label, n in enumerate(counts)])
    rng.shuffle(labels)
    return labels


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def generate(root: Path, counts=DEFAULT_COUNTS, seed: int = 0, staging: Path | None = None) -> Path:
    """Nuclei in the Kaggle layout: `train.csv` (Filename,Label) + `train/<n>.png`."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        rows = ["Filename,Label"]
        for number, label in enumerate(_shuffled_labels(rng, counts), start=1):
            _save(make_patch(rng, int(label)), folder / "train" / f"{number}.png")
            rows.append(f"{number}.png,{label}")
        (folder / "train.csv").write_text("\n".join(rows) + "\n")

    return _materialise(root, {"layout": "kaggle", "counts": list(counts), "seed": seed}, write, staging)


def generate_folder(root: Path, classes: list[str], counts=DEFAULT_COUNTS, seed: int = 0,
                    staging: Path | None = None) -> Path:
    """The nuclei demo patches in the bring-your-own layout: `<class>/<n>.png`."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        for number, label in enumerate(_shuffled_labels(rng, counts), start=1):
            _save(make_patch(rng, int(label)), folder / classes[label] / f"{number}.png")

    return _materialise(root, {"layout": "folder", "classes": classes, "counts": list(counts), "seed": seed}, write,
                        staging)


def generate_all_idb(root: Path, counts=(60, 60), seed: int = 0, staging: Path | None = None) -> Path:
    """ALL-IDB2-style lymphocyte crops: `ALL_IDB2/img/ImNNN_L.png`, L=1 blast, L=0 normal."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        for number, label in enumerate(_shuffled_labels(rng, counts), start=1):
            patch = make_patch(rng, int(label), LEUKEMIA_LOOKS)
            _save(patch, folder / "ALL_IDB2" / "img" / f"Im{number:03d}_{label}.png")

    return _materialise(root, {"layout": "all-idb", "counts": list(counts), "seed": seed}, write, staging)


HEP2_PATCH = 78


def make_hep2_cell(rng: np.random.Generator, label: int) -> np.ndarray:
    """One greyscale HEp-2 cell with the immunofluorescence pattern of class `label`
    (0 homogeneous, 1 speckled, 2 nucleolar, 3 centromere, 4 nuclear membrane, 5 Golgi)."""
    yy, xx = np.mgrid[0:HEP2_PATCH, 0:HEP2_PATCH].astype(np.float64)
    cy, cx = HEP2_PATCH / 2 + rng.normal(0, 2, size=2)
    ry, rx = rng.uniform(20, 30), rng.uniform(20, 30)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    nucleus = 1.0 / (1.0 + np.exp((r - 1.0) * 14.0))

    def spots(count, sigma, spread=0.8):
        out = np.zeros_like(r)
        for _ in range(count):
            a, d = rng.uniform(0, 2 * np.pi), spread * np.sqrt(rng.uniform())
            sy, sx = cy + d * ry * np.sin(a), cx + d * rx * np.cos(a)
            out += np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * sigma**2))
        return out

    texture = ndimage.gaussian_filter(rng.normal(size=r.shape), 1.5)
    if label == 0:
        signal = nucleus * (0.8 + 0.08 * texture)
    elif label == 1:
        signal = nucleus * (0.35 + 0.9 * np.clip(ndimage.gaussian_filter(rng.random(r.shape), 0.9) - 0.45, 0, 1) * 4)
    elif label == 2:
        signal = nucleus * 0.15 + nucleus * spots(rng.integers(2, 6), rng.uniform(2.5, 4.0), 0.6)
    elif label == 3:
        signal = nucleus * 0.08 + nucleus * spots(rng.integers(25, 50), rng.uniform(0.8, 1.2))
    elif label == 4:
        signal = nucleus * 0.2 + 0.9 * np.exp(-((r - 0.95) ** 2) / (2 * 0.06**2))
    else:
        a = rng.uniform(0, 2 * np.pi)
        cap = np.exp(-((xx - cx - 0.85 * rx * np.cos(a)) ** 2 + (yy - cy - 0.85 * ry * np.sin(a)) ** 2) / (2 * 6.0**2))
        signal = nucleus * 0.15 + 1.1 * cap * np.clip(r, 0.6, 1.2)  # a perinuclear cap on one side
    # Neighbouring cells at the border, staining strength (positive vs intermediate), camera noise.
    for _ in range(rng.integers(0, 3)):
        a = rng.uniform(0, 2 * np.pi)
        ny, nx = cy + 52 * np.sin(a), cx + 52 * np.cos(a)
        signal += 0.6 * np.exp(-(((yy - ny) / 22) ** 2 + ((xx - nx) / 22) ** 2) ** 2)
    image = signal * rng.uniform(0.4, 1.0) * 220
    image = ndimage.gaussian_filter(image, rng.uniform(0.6, 1.4)) + rng.normal(10, rng.uniform(2, 7), size=r.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_hep2(root: Path, per_class: int = 40, seed: int = 0, staging: Path | None = None) -> Path:
    """ICPR 2014 layout: `gt_training.csv` ("Image ID,Image class") + `training/` and
    `validation/` folders of zero-padded `NNNNN.png` (validation/ is about a fifth)."""
    from tune_cells.data.importers import HEP2_CLASSES

    def write(folder: Path, rng: np.random.Generator) -> None:
        rows = ["Image ID,Image class"]
        for number, label in enumerate(_shuffled_labels(rng, [per_class] * len(HEP2_CLASSES)), start=1):
            part = "validation" if rng.random() < 0.2 else "training"
            _save(make_hep2_cell(rng, int(label)), folder / part / f"{number:05d}.png")
            rows.append(f"{number},{HEP2_CLASSES[label]}")
        (folder / "gt_training.csv").write_text("\n".join(rows) + "\n")

    return _materialise(root, {"layout": "hep2", "per_class": per_class, "seed": seed}, write, staging)


LUNG_TARGETS = ("Parenchyma", "SevereInflammation")


def make_lung_field(rng: np.random.Generator, height: int, width: int, inflamed: bool = True):
    """An H&E-like lung field and its masks: pink parenchyma with alveolar holes on a white
    background, and (when `inflamed`) patches of densely packed dark nuclei inside it."""
    yy, xx = np.mgrid[0:height, 0:width]
    tissue_field = ndimage.gaussian_filter(rng.normal(size=(height, width)), height / 8)
    tissue = tissue_field > np.quantile(tissue_field, rng.uniform(0.3, 0.6))
    alveoli = ndimage.gaussian_filter(rng.normal(size=(height, width)), 3) > 0.12
    parenchyma = tissue & ~(alveoli & (ndimage.gaussian_filter(rng.normal(size=(height, width)), 20) > 0))
    parenchyma = ndimage.binary_opening(parenchyma, iterations=1)
    inflammation = np.zeros_like(parenchyma)
    if inflamed:
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            radius = rng.uniform(0.06, 0.14) * height
            blob = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * rng.uniform(0.7, 1.5))) ** 2 < 1
            inflammation |= blob & tissue
        parenchyma |= inflammation  # inflamed regions are solid tissue (no air spaces)
    eosin = np.where(parenchyma, rng.uniform(0.35, 0.6), 0.0) + rng.normal(0, 0.03, (height, width))
    haematoxylin = np.where(parenchyma, 0.08, 0.0)
    nuclei = ndimage.gaussian_filter((rng.random((height, width)) < 0.004).astype(float), 1.2) * 12
    haematoxylin += np.where(parenchyma, nuclei, 0.0)
    dense = ndimage.gaussian_filter((rng.random((height, width)) < 0.05).astype(float), 1.0) * 6
    haematoxylin += np.where(inflammation, dense + 0.35, 0.0)
    density = eosin[..., None] * EOSIN + haematoxylin[..., None] * HEMATOXYLIN
    image = 255 * np.exp(-np.clip(density, 0, None) * 1.6) * rng.uniform(0.92, 1.0, size=3)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, parenchyma.astype(np.uint8), inflammation.astype(np.uint8)


def generate_lung(root: Path, images: int = 10, size: tuple[int, int] = (464, 348), seed: int = 0,
                  staging: Path | None = None) -> Path:
    """LungNeuralNet layout: `train/Original/<name>.jpg` and same-name JPEG masks in
    `train/Parenchyma/` and `train/SevereInflammation/` (lossy, so they need thresholding; the last
    image has no inflammation, so one mask is all black as in the real data)."""

    def write(folder: Path, rng: np.random.Generator) -> None:
        for number in range(1, images + 1):
            image, parenchyma, inflammation = make_lung_field(rng, size[1], size[0], inflamed=number < images)
            name = f"{number}_demo_lung.jpg"
            for sub, array in zip(("Original", *LUNG_TARGETS), (image, parenchyma * 255, inflammation * 255)):
                path = folder / "train" / sub / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(path, quality=90)

    return _materialise(root, {"layout": "lung", "images": images, "size": list(size), "seed": seed}, write, staging)
