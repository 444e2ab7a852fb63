"""Train and eval presets (torchvision-references style), applied to whole batches.

Images are kept decoded in memory as uint8 N×H×W×C; a batch is turned into normalised
float N×C×S×S here. Augmentation draws its parameters per sample but runs as a few batched
tensor ops: torchvision's v2 transforms draw one set of parameters per call, which for a batch
would flip or rotate every image the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_uint8_tensor(batch) -> torch.Tensor:
    """A uint8 batch as a tensor; arrays from Ray's object store are read-only, so copy those."""
    if isinstance(batch, torch.Tensor):
        return batch
    if not batch.flags.writeable:
        batch = batch.copy()
    return torch.from_numpy(batch)


@dataclass(frozen=True)
class EvalPreset:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        x = to_uint8_tensor(batch_uint8).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class TrainPreset:
    """Eval preprocessing plus augmentation: dihedral flips/rotations, affine and stain jitter.

    `affine` and `color_jitter` are strengths in [0, 1]; 0 turns that augmentation off.
    """

    eval_preset: EvalPreset
    flip: bool = True
    rotate90: bool = True
    affine: float = 0.0
    color_jitter: float = 0.0

    def __call__(self, batch_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ep = self.eval_preset
        x = to_uint8_tensor(batch_uint8).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != ep.image_size or x.shape[-2] != ep.image_size:
            x = F.interpolate(x, size=(ep.image_size, ep.image_size), mode="bilinear", antialias=True, align_corners=False)
        n = x.shape[0]
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
        if self.flip:
            flip = rand(n) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.rotate90:  # cells have no "up": all four right-angle rotations are equally valid
            turns = (rand(n) * 4).long()
            for k in (1, 2, 3):
                x = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(-2, -1)), x)
        if self.affine > 0:
            x = self._affine(x, rand)
        if self.color_jitter > 0:
            x = self._stain_jitter(x, rand)
        return ep.normalize(x)

    def _affine(self, x, rand):
        n, s = x.shape[0], self.affine
        angle = (rand(n) * 2 - 1) * math.pi * s  # up to ±180° at full strength
        scale = 1 + (rand(n) * 2 - 1) * 0.2 * s
        shear = (rand(n) * 2 - 1) * 0.2 * s
        shift = (rand(n, 2) * 2 - 1) * 0.1 * s
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _stain_jitter(self, x, rand):
        """Per-channel scale and shift in optical density (Tellez et al. 2018 style, for H&E),
        which for a grey channel is a contrast and brightness jitter."""
        n, c, s = x.shape[0], x.shape[1], self.color_jitter
        od = -torch.log(x.clamp_min(1.0 / 255))
        alpha = 1 + (rand(n, c, 1, 1) * 2 - 1) * 0.3 * s
        beta = (rand(n, c, 1, 1) * 2 - 1) * 0.1 * s
        return torch.exp(-(od * alpha + beta)).clamp_(0, 1)


def channel_stats(images_uint8) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 N×H×W×C array (the training part only)."""
    x = torch.as_tensor(images_uint8).float().div_(255.0)
    flat = x.reshape(-1, x.shape[-1])
    std = flat.std(0).clamp_min(1e-3)
    return tuple(round(v, 6) for v in flat.mean(0).tolist()), tuple(round(v, 6) for v in std.tolist())
