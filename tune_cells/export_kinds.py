"""What each task kind exports (tune_cells.exporting): the graph from normalised input to
probabilities, the preprocessing contract around it, and the parity check against the registered
model's own prediction path (ImageClassifier.predict_proba, ImageSegmenter.predict_proba).

The check builds the graph's input from the contract, never from the registered model's spec, so
what a user reads in the contract is what was checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tune_cells.classifier import ImageClassifier
from tune_cells.config import SegmentationConfig
from tune_cells.exporting import BATCH, INPUT_NAME, Runner, TensorSpec
from tune_cells.segmentation import ImageSegmenter, LogitEnsemble, dihedral_logits, predict_logits_tiled, rescale_image
from tune_cells.transforms import EvalPreset

LAYOUT = "decoded images are uint8 H×W×C (0-255); the graph takes float32 N×C×H×W, normalised"
VALUE_RANGE = "x / 255, then (x - mean[c]) / std[c] per channel c"
DECODE = ("decode with Pillow; 16-bit images are scaled by their maximum to 8 bit; convert to {colour} "
          "({channels} channel{s})")
FIRST_BATCH = 1  # parity runs one image alone first, then batches of BATCH_SIZE: two sizes through the batch axis
BATCH_SIZE = 16


def _example(channels: int, side: int) -> torch.Tensor:
    """The tracing input: two normalised-looking images (the batch axis stays free)."""
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))


def _colour(channels: int) -> str:
    return "RGB" if channels == 3 else "L (grey)"


# --- classification -------------------------------------------------------------------------------


class ClassifierGraph(torch.nn.Module):
    """ImageClassifier.predict_proba as one graph: each member's logits (the mean over the eight
    dihedral views when the spec asks for them), divided by the temperature, softmax, and the mean
    of the members' probabilities."""

    def __init__(self, members: list[torch.nn.Module], temperature: float, dihedral: bool):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.temperature = float(temperature)
        self.dihedral = dihedral

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = 1
        if self.dihedral:  # classifier.dihedral_views on N×C×H×W: four turns, then each flipped left-right
            turns = [torch.rot90(x, k, (2, 3)) for k in range(4)]
            x = torch.cat(turns + [turn.flip(3) for turn in turns])  # the 8 views as one batch
            views = 8
        probabilities = []
        for member in self.members:
            logits = member(x)
            logits = logits.reshape(views, -1, logits.shape[-1]).mean(0)
            probabilities.append(torch.softmax(logits / self.temperature, 1))
        return torch.stack(probabilities).mean(0)


@dataclass
class ClassifierContract:
    classes: list[str]
    channels: int
    colour: str
    decode_size: int  # decoded images are this square size first ...
    input_size: int  # ... then resized to this (the graph's input side)
    mean: list[float]
    std: list[float]
    value_range: str
    layout: str
    resize: str
    temperature: float
    tta: str
    members: int


class ClassifierExport:
    max_images = 32

    def __init__(self, predictor: ImageClassifier):
        spec = predictor.spec
        self.predictor = predictor
        self.graph = ClassifierGraph(predictor.members, spec.temperature, spec.tta == "dihedral").eval()
        self.contract = ClassifierContract(
            classes=list(spec.classes), channels=spec.channels, colour=_colour(spec.channels),
            decode_size=spec.store_size, input_size=spec.image_size, mean=list(spec.mean), std=list(spec.std),
            value_range=VALUE_RANGE, layout=LAYOUT,
            resize=("decode_size -> input_size: torch.nn.functional.interpolate(mode='bilinear', antialias=True, "
                    "align_corners=False) on the float image, before normalising"),
            temperature=spec.temperature, tta=spec.tta, members=len(predictor.members))
        self.outputs = [TensorSpec("probabilities", [BATCH, len(spec.classes)], "float32",
                                   "class probabilities in the order of `classes` (each row sums to 1)")]

    def input_spec(self) -> TensorSpec:
        c = self.contract
        return TensorSpec(INPUT_NAME, [BATCH, c.channels, c.input_size, c.input_size], "float32",
                          "normalised images (see `preprocessing`)")

    def example(self) -> torch.Tensor:
        return _example(self.contract.channels, self.contract.input_size)

    def load_images(self, reader, part: str, purpose: str) -> np.ndarray:
        return reader.load(part, purpose)[0]

    def preprocessing(self) -> list[str]:
        c = self.contract
        return [
            DECODE.format(colour=c.colour, channels=c.channels, s="s" if c.channels > 1 else ""),
            f"resize to {c.decode_size}×{c.decode_size} (Pillow bilinear, reducing_gap=None) unless already that "
            "size: uint8 H×W×C",
            "to float32 C×H×W divided by 255",
            f"resize to {c.input_size}×{c.input_size}: {c.resize.split(': ', 1)[1]}"
            if c.decode_size != c.input_size else "no second resize (decode_size equals input_size)",
            f"normalise: (x - mean[c]) / std[c] with mean {c.mean}, std {c.std}",
            f"stack to N×{c.channels}×{c.input_size}×{c.input_size} float32: the graph's `{INPUT_NAME}`",
        ]

    def in_graph(self) -> list[str]:
        c = self.contract
        members = f"the mean of the class probabilities of {c.members} members" if c.members > 1 else "the network"
        done = [members]
        if c.tta == "dihedral":
            done.append("test-time augmentation: each member's logits are the mean over the 8 flips and right-angle "
                        "turns of the input")
        done.append(f"temperature scaling: softmax(logits / {c.temperature:g})")
        return done

    def not_in_graph(self) -> list[str]:
        return ["decoding and resizing the image (see `preprocessing`)", "normalising (mean, std)",
                "the predicted class: the argmax of `probabilities`, named by `classes`"]

    def parity(self, run: Runner, images: np.ndarray) -> tuple[float, dict[str, float]]:
        """The graph fed as the contract says, against the registered model's probabilities."""
        c = self.contract
        reference = self.predictor.predict_proba(images)
        x = EvalPreset(c.input_size, tuple(c.mean), tuple(c.std))(images).numpy()
        got = np.concatenate([run(x[start:stop])["probabilities"] for start, stop in _batches(len(x))])
        worst = float(np.abs(got.astype(np.float64) - reference).max())
        return worst, {"probabilities": worst}


def _batches(count: int) -> list[tuple[int, int]]:
    bounds = [0, min(count, FIRST_BATCH), *range(FIRST_BATCH + BATCH_SIZE, count, BATCH_SIZE), count]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# --- segmentation ---------------------------------------------------------------------------------


class SegmenterGraph(torch.nn.Module):
    """One tile through ImageSegmenter's network: the mean of the members' logits (each the mean over
    the tile's 8 flips and turns when the spec asks for them) divided by the temperature, and their
    per-target sigmoid."""

    def __init__(self, members: list[torch.nn.Module], temperature: float, dihedral: bool = False):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.temperature = float(temperature)
        self.dihedral = dihedral

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def network(tiles: torch.Tensor) -> torch.Tensor:
            return torch.stack([member(tiles) for member in self.members]).mean(0)

        logits = (dihedral_logits(network, x) if self.dihedral else network(x)) / self.temperature
        return torch.sigmoid(logits), logits


@dataclass
class TilingContract:
    scale: float  # images are worked on at this fraction of their size
    tile_size: int  # the tile's side in original pixels, as trained
    tile: int  # the tile's side at working scale: the graph's input side
    overlap: float
    stride: int
    starts: str
    padding: str
    blend: str
    resize_back: str


@dataclass
class SegmenterContract:
    targets: list[str]
    thresholds: dict[str, float]
    activation: str
    channels: int
    colour: str
    mean: list[float]
    std: list[float]
    value_range: str
    layout: str
    temperature: float
    tta: str  # none, or dihedral: the graph averages each tile's 8 flips and turns
    members: int
    tiling: TilingContract


class SegmenterExport:
    max_images = 8  # whole fields: each is many tiles

    def __init__(self, predictor: ImageSegmenter):
        spec = predictor.spec
        model = predictor.model
        members = list(model.members) if isinstance(model, LogitEnsemble) else [model]
        self.predictor = predictor
        self.graph = SegmenterGraph(members, spec.temperature, predictor.dihedral).eval()
        tile = predictor.tile
        config = SegmentationConfig.from_flat(spec.config, strict=False, source=f"model {spec.task}")
        tiling = TilingContract(
            scale=predictor.scale, tile_size=config.tile_size, tile=tile,
            overlap=predictor.overlap, stride=max(1, tile - int(round(tile * predictor.overlap))),
            starts="along each axis of length L (after padding): 0, stride, 2·stride, ... below L - tile, then L - tile",
            padding="when the scaled image is smaller than a tile: pad right and bottom with 0 after normalising "
                    "(the mean colour; training pads its views so, the masks with background)",
            blend=("sum over tiles of logits × window / sum of windows; window = outer(w, w), "
                   "w[i] = 0.1 + 0.9 × min(1, min(i + 1, tile - i) / (tile / 4))"),
            resize_back=("crop the padding, resize the blended logits to the original H×W "
                         "(torch.nn.functional.interpolate bilinear, align_corners=False, no antialias), then sigmoid"))
        self.contract = SegmenterContract(
            targets=list(spec.classes),
            thresholds={target: float(spec.thresholds.get(target, config.threshold)) for target in spec.classes},
            activation="sigmoid per target (multi-label: a pixel may belong to several targets)",
            channels=spec.channels, colour=_colour(spec.channels), mean=list(spec.mean), std=list(spec.std),
            value_range=VALUE_RANGE, layout=LAYOUT, temperature=spec.temperature, tta=spec.tta, members=len(members),
            tiling=tiling)
        shape = [BATCH, len(spec.classes), tile, tile]
        self.outputs = [
            TensorSpec("probabilities", shape, "float32", "per-target probability of each pixel of the tile"),
            TensorSpec("logits", shape, "float32", "per-target logits, already divided by the temperature: blend "
                       "these across tiles (see `tiling`), then sigmoid"),
        ]

    def input_spec(self) -> TensorSpec:
        c = self.contract
        return TensorSpec(INPUT_NAME, [BATCH, c.channels, c.tiling.tile, c.tiling.tile], "float32",
                          "normalised tiles of the scaled image (see `preprocessing` and `tiling`)")

    def example(self) -> torch.Tensor:
        return _example(self.contract.channels, self.contract.tiling.tile)

    def load_images(self, reader, part: str, purpose: str) -> list[np.ndarray]:
        return reader.load_segmentation(part, purpose)[0]

    def preprocessing(self) -> list[str]:
        c, t = self.contract, self.contract.tiling
        return [
            DECODE.format(colour=c.colour, channels=c.channels, s="s") + ", at its own size: uint8 H×W×3",
            f"scale by {t.scale:g}: resize to (round(W × {t.scale:g}), round(H × {t.scale:g})) with Pillow bilinear, "
            "reducing_gap=None" if t.scale != 1.0 else "no scaling (scale 1)",
            f"to float32 C×H×W divided by 255; normalise: (x - mean[c]) / std[c] with mean {c.mean}, std {c.std}",
            f"cut {t.tile}×{t.tile} tiles with stride {t.stride} (see `tiling`) and stack them: the graph's "
            f"`{INPUT_NAME}`",
            f"stitch the tiles' `logits` (see `tiling`), then a pixel belongs to a target where its probability is "
            f"above the target's threshold {c.thresholds}",
        ]

    def in_graph(self) -> list[str]:
        c = self.contract
        members = f"the mean of the logits of {c.members} members" if c.members > 1 else "the network"
        done = [f"{members}, on one tile"]
        if c.tta == "dihedral":
            done.append("test-time augmentation: the logits are the mean over the tile's 8 flips and right-angle "
                        "turns, each turned back")
        return [*done, f"temperature: logits / {c.temperature:g}", f"{c.activation}"]

    def not_in_graph(self) -> list[str]:
        return ["decoding and scaling the image, normalising (see `preprocessing`)",
                "tiling the field, blending the tiles' logits and resizing back to the original size (see `tiling`)",
                "the per-target thresholds that turn probabilities into masks (see `thresholds`)"]

    def parity(self, run: Runner, images: list[np.ndarray]) -> tuple[float, dict[str, float]]:
        """Whole fields stitched from the graph's tiles as the contract says, against the registered
        model's probabilities; and each tile's `probabilities` against the registered network's."""
        c, t = self.contract, self.contract.tiling
        graph = _CheckedTiles(run, self.predictor.model, self.predictor.spec.temperature, self.predictor.dihedral)
        preset = EvalPreset(0, tuple(c.mean), tuple(c.std))
        worst_field = 0.0
        for image in images:
            reference = self.predictor.predict_proba(image)
            logits = predict_logits_tiled(graph, rescale_image(image, t.scale), preset, t.tile, t.overlap,
                                          torch.device("cpu"))
            if logits.shape[-2:] != image.shape[:2]:
                logits = F.interpolate(logits[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            worst_field = worse(worst_field, torch.sigmoid(logits).numpy() - reference)
        return max(worst_field, graph.worst), {"stitched_fields": worst_field, "tile_probabilities": graph.worst}


def worse(worst: float, difference: np.ndarray) -> float:
    """The larger of `worst` and the largest |difference|; infinite where a difference is NaN (a graph
    that outputs NaN fails parity: Python's max(0.0, nan) would keep 0.0)."""
    largest = float(np.abs(difference).max())
    return math.inf if math.isnan(largest) else max(worst, largest)


class _CheckedTiles(torch.nn.Module):
    """The exported graph as the network predict_logits_tiled stitches: returns its `logits`, and
    keeps the largest difference of its `probabilities` to the registered network's on the same tiles."""

    def __init__(self, run: Runner, reference: torch.nn.Module, temperature: float, dihedral: bool):
        super().__init__()
        self.run = run
        self.reference = reference
        self.temperature = temperature
        self.dihedral = dihedral
        self.worst = 0.0

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.run(tiles.numpy())
        with torch.no_grad():
            logits = dihedral_logits(self.reference, tiles) if self.dihedral else self.reference(tiles)
            expected = torch.sigmoid(logits / self.temperature).numpy()
        self.worst = worse(self.worst, out["probabilities"] - expected)
        return torch.from_numpy(out["logits"])
