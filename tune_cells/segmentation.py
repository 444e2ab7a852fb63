"""Segmentation: tiles in, stitched full-size masks out; the one prediction path shared by the
trainable's validation, evaluation, `tune-cells predict` and serving.

Images are worked on at `scale` times their size (set in the trial config; 0.5 by default, see
`tune_cells.config.SegmentationConfig`, since CPU training at the full 1392×1040 is slow), cut into square views of `tile_size` original pixels
that overlap by `overlap`, and the views' logits are blended with a tapered window so seams do
not show. The blended logits are resized back to the original size before thresholding, so masks,
Dice and pixel counts always refer to the original pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from tune_cells.config import SegmentationConfig
from tune_cells.data.images import MASK_THRESHOLD, decode_full, scaled_size
from tune_cells.model_io import ModelSpec, base64_image_file, load_spec
from tune_cells.output_files import unique_stems
from tune_cells.training import FLOAT32, Precision
from tune_cells.transforms import EvalPreset

NETWORK_STRIDE = 32  # a U-Net of depth <= 5 needs sides divisible by 2**5


def working_tile(tile_size: int, scale: float) -> int:
    """The side of a view at working scale, a multiple of the network stride."""
    return max(NETWORK_STRIDE, int(round(tile_size * scale / NETWORK_STRIDE)) * NETWORK_STRIDE)


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """H×W×3 uint8 at `scale` (PIL bilinear, as `decode_full` does for files)."""
    if scale == 1.0:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize(scaled_size(pil.size, scale), Image.Resampling.BILINEAR, reducing_gap=None))


def rescale_masks(masks: np.ndarray, scale: float) -> np.ndarray:
    """T×H×W 0/1 masks at `scale`: bilinear on 0/255, then the same threshold as decoding."""
    if scale == 1.0:
        return masks
    resized = []
    for mask in masks:
        grey = Image.fromarray((mask * 255).astype(np.uint8))
        resized.append((np.asarray(grey.resize(scaled_size(grey.size, scale), Image.Resampling.BILINEAR,
                                               reducing_gap=None)) > MASK_THRESHOLD).astype(np.uint8))
    return np.stack(resized)


def pixel_stats(images: list[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) over every pixel of images of any sizes."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for image in images:
        flat = image.reshape(-1, 3).astype(np.float64) / 255.0
        total += flat.sum(0)
        squares += (flat**2).sum(0)
        count += len(flat)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-6))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def pad_to_view(image: np.ndarray, masks: np.ndarray, tile: int,
                fill: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An H×W×3 image and its T×H×W masks padded right and bottom to at least `tile` on each side,
    as nnU-Net pads a field smaller than its patch: the image with `fill` (the training images' mean
    colour, 0 once normalised, as `predict_logits_tiled` pads), the masks with background. Copying
    the edge instead smeared its last row and column over the pad, and their labels with them (a
    200×150 field in a 256 view: 54 % of the view invented, half of that labelled parenchyma)."""
    pad_h, pad_w = max(0, tile - image.shape[0]), max(0, tile - image.shape[1])
    if not (pad_h or pad_w):
        return image, masks
    padded = np.empty((image.shape[0] + pad_h, image.shape[1] + pad_w, image.shape[2]), dtype=image.dtype)
    padded[...] = np.asarray(fill, dtype=image.dtype)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded, np.pad(masks, ((0, 0), (0, pad_h), (0, pad_w)))  # 0: no target


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with views of `tile` overlapping by about `overlap`."""
    if length <= tile:
        return [0]
    stride = max(1, tile - int(round(tile * overlap)))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@lru_cache(maxsize=8)
def _blend_window(tile: int) -> torch.Tensor:
    """Weights that fall off towards a view's border (never to 0, so image borders still count)."""
    ramp = torch.minimum(torch.arange(tile) + 1, torch.arange(tile, 0, -1)).float()
    ramp = torch.clamp(ramp / (tile / 4), max=1.0) * 0.9 + 0.1
    return ramp[:, None] * ramp[None, :]


def dihedral_logits(model: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor,
                    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Test-time augmentation of square views (N×C×S×S): the mean of the network's logits over the 8
    flips and right-angle turns, each turned back first (nnU-Net's mirroring, with turns: tissue has
    no up or down). The same arithmetic in the exported graph. `prepare` lays out each turned view
    as the network runs fastest (`Precision.prepare_input`: turning loses channels-last)."""
    total = None
    for turns in range(4):
        turned = torch.rot90(views, turns, (-2, -1))
        for flipped in (False, True):
            view = turned.flip(-1) if flipped else turned
            out = model(prepare(view) if prepare else view).float()  # summed in float32 under autocast
            out = torch.rot90(out.flip(-1) if flipped else out, -turns, (-2, -1))
            total = out if total is None else total + out
    return total / 8


@torch.no_grad()
def predict_logits_tiled(model: torch.nn.Module, image: np.ndarray, preset: EvalPreset, tile: int, overlap: float,
                         device: torch.device, batch_size: int = 4, precision: Precision = FLOAT32,
                         dihedral: bool = False) -> torch.Tensor:
    """Blended logits T×H×W (on the CPU) for one H×W×3 uint8 image; an image smaller than a view is
    padded right and bottom with 0 once normalised (the training mean colour, as `pad_to_view` pads
    training views: what a convolution's own zero padding shows the network at every view's border)
    and the padding cropped off. The image goes to the device once; views are cut, predicted and
    blended there.
    `dihedral`: each view's logits are the mean over its 8 flips and turns (`dihedral_logits`)."""
    model.eval()
    height, width = image.shape[:2]
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float().div_(255.0)  # a copy
    x = preset.normalize(x)
    pad_h, pad_w = max(0, tile - height), max(0, tile - width)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # not the edge copied: see pad_to_view
    boxes = [(y, x0) for y in tile_starts(x.shape[-2], tile, overlap) for x0 in tile_starts(x.shape[-1], tile, overlap)]
    window = _blend_window(tile).to(device)
    total = weight = None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        views = precision.prepare_input(torch.cat([x[..., y : y + tile, x0 : x0 + tile] for y, x0 in chunk]))
        with precision.autocast(device):
            logits = (dihedral_logits(model, views, precision.prepare_input) if dihedral else model(views)).float()
        if total is None:
            total = torch.zeros(logits.shape[1], *x.shape[-2:], device=device)
            weight = torch.zeros(x.shape[-2:], device=device)
        for (y, x0), view in zip(chunk, logits):
            total[:, y : y + tile, x0 : x0 + tile] += view * window
            weight[y : y + tile, x0 : x0 + tile] += window
    return (total / weight)[:, :height, :width].cpu()


class LogitEnsemble(torch.nn.Module):
    """Fold members as one network: the mean of their logits, before stitching and thresholds."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


class ImageSegmenter:
    """A trained segmentation network and its preprocessing: full-size images in, full-size masks out."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.preset = EvalPreset(0, tuple(spec.mean), tuple(spec.std))
        self.config = config = SegmentationConfig.from_flat(spec.config, strict=False, source=f"model {spec.task}")
        self.scale = config.scale
        self.tile = working_tile(config.tile_size, self.scale)
        self.overlap = config.overlap
        # One threshold per target: the spec's (chosen on validation) or the trial's.
        self.thresholds = np.array([spec.thresholds.get(t, config.threshold) for t in spec.classes], dtype=np.float32)

    @classmethod
    def from_checkpoint(cls, directory: Path, device: str = "cpu") -> ImageSegmenter:
        spec = load_spec(directory)
        members = spec.load_members(directory)
        return cls(members[0] if len(members) == 1 else LogitEnsemble(members), spec, device)

    @property
    def targets(self) -> list[str]:
        return self.spec.classes

    @property
    def dihedral(self) -> bool:
        """Test-time augmentation, as chosen on validation at promotion (analysis/thresholds.py)."""
        return self.spec.tta == "dihedral"

    def decode_path(self, path: str | Path) -> np.ndarray:
        return decode_full(Path(path))

    def decode_base64(self, text: str) -> np.ndarray:
        return decode_full(base64_image_file(text))

    def decode_file(self, file: Path | BinaryIO) -> np.ndarray:
        """An image file or an open binary file object, at its own size."""
        return decode_full(file)

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """T×H×W float32 probabilities at the image's own size."""
        logits = predict_logits_tiled(self.model, rescale_image(image, self.scale), self.preset, self.tile,
                                      self.overlap, self.device, dihedral=self.dihedral)
        if logits.shape[-2:] != image.shape[:2]:
            logits = F.interpolate(logits[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        return torch.sigmoid(logits / self.spec.temperature).numpy()

    def predict_masks(self, image: np.ndarray) -> np.ndarray:
        """T×H×W uint8 0/1 masks at the image's own size."""
        return (self.predict_proba(image) > self.thresholds[:, None, None]).astype(np.uint8)

    def predict_table(self, images: list[np.ndarray], masks: list[np.ndarray] | None = None) -> pd.DataFrame:
        """Per image: its size, and the pixel count and percentage of each target."""
        masks = masks if masks is not None else [self.predict_masks(image) for image in images]
        return pixel_table(masks, self.targets)


def pixel_table(masks: list[np.ndarray], targets: list[str]) -> pd.DataFrame:
    columns = ["width", "height", *[c for t in targets for c in (f"pixels_{t}", f"percent_{t}")]]
    rows = []
    for mask in masks:
        area = mask.shape[-1] * mask.shape[-2]
        row = {"width": mask.shape[-1], "height": mask.shape[-2]}
        for k, target in enumerate(targets):
            count = int(np.count_nonzero(mask[k]))
            row[f"pixels_{target}"] = count
            row[f"percent_{target}"] = round(100.0 * count / area, 3)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# Overlay colours per target (RGB), cycled: parenchyma green, inflammation magenta, ...
OVERLAY_COLOURS = ((46, 204, 64), (240, 18, 190), (0, 116, 217), (255, 133, 27), (255, 220, 0))


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """The image with each target's mask tinted and outlined (targets drawn in order)."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks.astype(bool)):
        colour = np.array(OVERLAY_COLOURS[k % len(OVERLAY_COLOURS)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~_eroded(mask)
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    core = padded[1:-1, 1:-1].copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        core &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return core


def save_mask_png(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def write_predictions(segmenter: ImageSegmenter, names: list[str], images: list[np.ndarray], masks: list[np.ndarray],
                      folder: Path) -> pd.DataFrame:
    """Per image: `<stem>_<target>.png` masks and `<stem>_overlay.png`; returns the pixel-count table."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, image, mask in zip(unique_stems(names), images, masks):
        for k, target in enumerate(segmenter.targets):
            save_mask_png(mask[k], folder / f"{stem}_{target}.png")
        Image.fromarray(overlay(image, mask)).save(folder / f"{stem}_overlay.png")
    table = segmenter.predict_table(images, masks)
    table.insert(0, "image", list(names))
    return table
