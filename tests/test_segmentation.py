"""Segmentation pieces with real files and the real network: importer checks, tiling/stitching,
the empty-mask convention, per-image vs pooled Dice, the U-Net factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tune_cells.analysis.segmentation_metrics import dice, segmentation_scores
from tune_cells.data.demo import generate_lung
from tune_cells.data.importers import import_lung_masks
from tune_cells.errors import UserInputError
from tune_cells.models import create_model
from tune_cells.segmentation import (
    dihedral_logits,
    overlay,
    pixel_table,
    predict_logits_tiled,
    rescale_masks,
    tile_starts,
    working_tile,
)
from tune_cells.transforms import EvalPreset

from conftest import SHARED_DATA


def write_lung(root, sizes=((60, 40), (60, 40)), mask_size=None, missing_mask=False, extra_target=False):
    for n, size in enumerate(sizes):
        name = f"im{n}.jpg"
        for sub in ("Original", "Parenchyma", "SevereInflammation"):
            folder = root / "train" / sub
            folder.mkdir(parents=True, exist_ok=True)
            if sub != "Original" and missing_mask and n == 1 and sub == "Parenchyma":
                continue
            shape = (mask_size or size) if sub != "Original" else size
            Image.new("RGB" if sub == "Original" else "L", shape, 128).save(folder / name)
    return root


def test_lung_importer_reads_targets_and_masks(tmp_path):
    index = import_lung_masks(write_lung(tmp_path / "lung"))
    assert index.kind == "segmentation"
    assert index.classes == ["Parenchyma", "SevereInflammation"]
    assert index.mask_paths("Parenchyma") == ["train/Parenchyma/im0.jpg", "train/Parenchyma/im1.jpg"]


@pytest.mark.parametrize("case,message", [
    ("missing_mask", "no mask Parenchyma/im1"),
    ("wrong_size", "mask is 30x20, its image is 60x40"),
    ("no_original", "no Original/ folder"),
])
def test_lung_importer_rejects_bad_layouts(tmp_path, case, message):
    root = tmp_path / "lung"
    if case == "missing_mask":
        write_lung(root, missing_mask=True)
    elif case == "wrong_size":
        write_lung(root, mask_size=(30, 20))
    else:
        (root / "train" / "images").mkdir(parents=True)
    with pytest.raises(UserInputError, match=message):
        import_lung_masks(root)


def test_lossy_masks_are_thresholded_and_one_mask_is_empty(tmp_path):
    root = generate_lung(tmp_path / "demo", images=3, size=(96, 64))
    index = import_lung_masks(root)
    from tune_cells.data.images import decode_mask

    masks = [decode_mask(root / p) for p in index.mask_paths("SevereInflammation")]
    assert all(set(np.unique(m)) <= {0, 1} for m in masks)
    assert masks[-1].sum() == 0  # the last demo image has no inflammation, as one real image


def test_tiles_cover_the_image_with_overlap():
    assert tile_starts(1040, 512, 0.25) == [0, 384, 528]
    assert tile_starts(300, 512, 0.25) == [0]
    assert working_tile(512, 0.5) == 256 and working_tile(512, 0.3) % 32 == 0


def test_stitching_a_pixelwise_network_reproduces_it_exactly():
    """A 1×1-conv network is pixelwise: stitched tiles must equal one pass over the whole image."""
    net = torch.nn.Conv2d(3, 2, 1)
    image = np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    preset = EvalPreset(0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    stitched = predict_logits_tiled(net, image, preset, 64, 0.25, torch.device("cpu"))
    whole = net(preset.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255))[0]
    assert stitched.shape == (2, 150, 230)
    torch.testing.assert_close(stitched, whole.detach(), atol=1e-5, rtol=1e-5)
    small = predict_logits_tiled(net, image[:40, :50], preset, 64, 0.25, torch.device("cpu"))  # padded view
    assert small.shape == (2, 40, 50)
    # A field smaller than a view is padded with 0 once normalised, as a convolution pads its input: a
    # 3x3 network sees it as it would the field alone (with the edge copied, its last row and column differed)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    field = np.ascontiguousarray(image[:40, :50])
    alone = conv(preset.normalize(torch.from_numpy(field).permute(2, 0, 1)[None].float() / 255))[0]
    torch.testing.assert_close(predict_logits_tiled(conv, field, preset, 64, 0.25, torch.device("cpu")),
                               alone.detach(), atol=1e-5, rtol=1e-5)


def test_test_time_augmentation_turns_each_view_back_and_averages_the_eight():
    """The mean over flips and turns is itself turn- and flip-equivariant, and a pixelwise network
    (equivariant already) is unchanged by it: each view's logits are turned back before the mean."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 3, padding=1)  # a 3×3 kernel: not equivariant
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        averaged = dihedral_logits(net, x)
        assert not torch.allclose(averaged, net(x), atol=1e-3)
        torch.testing.assert_close(dihedral_logits(net, torch.rot90(x, 1, (-2, -1))), torch.rot90(averaged, 1, (-2, -1)))
        torch.testing.assert_close(dihedral_logits(net, x.flip(-2)), averaged.flip(-2))
        pixelwise = torch.nn.Conv2d(3, 2, 1)
        torch.testing.assert_close(dihedral_logits(pixelwise, x), pixelwise(x))
        stitched = predict_logits_tiled(pixelwise, np.full((40, 50, 3), 90, np.uint8), EvalPreset(0, (0.5,) * 3, (0.25,) * 3),
                                        64, 0.25, torch.device("cpu"), dihedral=True)
    assert stitched.shape == (2, 40, 50)


def test_every_turned_view_reaches_the_network_in_the_trial_memory_layout():
    """Turning a channels-last batch returns a plain-layout one; the network (channels-last on a GPU)
    gets each of the 8 views laid out again, with the same logits."""
    from tune_cells.training import Precision

    layouts = []

    class Recording(torch.nn.Conv2d):
        def forward(self, x):
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
            return super().forward(x)

    torch.manual_seed(0)
    net, image = Recording(3, 2, 3, padding=1), np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    preset = EvalPreset(0, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        plain = predict_logits_tiled(net, image, preset, 32, 0.25, torch.device("cpu"), dihedral=True)
        layouts.clear()
        laid_out = predict_logits_tiled(net, image, preset, 32, 0.25, torch.device("cpu"), dihedral=True,
                                        precision=Precision(channels_last=True))
    assert len(layouts) == 8 and all(layouts)  # the 8 views of one batch of 4 tiles
    torch.testing.assert_close(laid_out, plain)


def test_empty_mask_convention_and_pooled_vs_per_image_dice():
    empty = np.zeros((4, 4), np.uint8)
    some = np.zeros((4, 4), np.uint8)
    some[0, 0] = 1
    assert dice(empty, empty) == 1.0
    assert dice(empty, some) == 0.0
    big_truth = np.ones((10, 10), np.uint8)
    truths = [big_truth[None], some[None]]
    predictions = [big_truth[None], empty[None]]
    summary, rows = segmentation_scores(truths, predictions, ["t"], "test_")
    assert summary["test_dice_t"] == pytest.approx(0.5)  # per image: 1 and 0
    assert summary["test_pooled_dice_t"] == pytest.approx(200 / 201)  # pooled: dominated by the big image
    false = segmentation_scores([empty[None]], [some[None]], ["t"], "x_")[0]
    assert false["x_empty_truth_false_pixels_t"] == 1


def test_pixel_table_and_overlay():
    masks = np.zeros((2, 10, 20), np.uint8)
    masks[0, :5] = 1
    table = pixel_table([masks], ["a", "b"])
    assert table.loc[0, "pixels_a"] == 100 and table.loc[0, "percent_a"] == 50.0 and table.loc[0, "pixels_b"] == 0
    image = np.full((10, 20, 3), 200, np.uint8)
    drawn = overlay(image, masks)
    assert drawn.shape == image.shape and (drawn[0, 0] != 200).any() and (drawn[9, 19] == 200).all()


def test_rescaled_masks_stay_binary():
    masks = np.zeros((1, 40, 60), np.uint8)
    masks[0, 10:30, 10:50] = 1
    half = rescale_masks(masks, 0.5)
    assert half.shape == (1, 20, 30) and set(np.unique(half)) == {0, 1}


@pytest.mark.parametrize("encoder,depth", [("resnet18", 3), ("mobilenet_v2", 5)])
def test_unet_factory_outputs_one_channel_per_target(encoder, depth):
    model = create_model("unet", num_classes=2, in_channels=3, encoder=encoder, depth=depth, base_width=8)
    assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def test_unet_rejects_unknown_encoder():
    with pytest.raises(UserInputError, match="unknown U-Net encoder"):
        create_model("unet", num_classes=2, in_channels=3, encoder="vgg99")


@pytest.mark.skipif(not (SHARED_DATA / "lung").is_dir(), reason="../shared/data/lung not present")
def test_real_lung_layout_imports():
    index = import_lung_masks(SHARED_DATA / "lung")
    assert len(index.items) == 10 and index.classes == ["Parenchyma", "SevereInflammation"]


def test_trainer_state_with_numpy_rng_loads_with_weights_only(tmp_path):
    """The segmentation trainable resumes its view sampler: its state must pass weights_only loading."""
    from tune_cells.model_io import ModelSpec, load_trainer_state, save_checkpoint

    rng = np.random.default_rng(3)
    rng.random(5)
    spec = ModelSpec("lung", "unet", ["a"], 3, 0, 64, [0.5] * 3, [0.2] * 3, {}, kind="segmentation")
    save_checkpoint(tmp_path, torch.nn.Conv2d(3, 1, 1), spec, {"numpy_rng": rng.bit_generator.state, "epoch": 2})
    restored = np.random.default_rng()
    restored.bit_generator.state = load_trainer_state(tmp_path)["numpy_rng"]
    assert restored.random() == rng.random()


def test_segmentation_images_and_masks_are_decoded_once(tmp_path):
    from tune_cells.data.images import decode_full, decode_mask
    from tune_cells.data.reader import SplitReader
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.preflight import decode_once
    from tune_cells.tasks import get_task

    index = import_lung_masks(generate_lung(tmp_path / "demo", images=10, size=(96, 64)))
    _, split, decoded = decode_once(get_task("lung"), index,
                                    lambda scan: load_or_create_split(tmp_path / "s.json", index, 0, scan.hashes), 0)
    rows = index.items.set_index("path")
    fitting = split.parts["train"] + split.parts["val"]
    masks = {rows.at[p, f"mask:{t}"] for p in fitting for t in index.classes}
    assert set(decoded) == set(fitting) | masks  # nothing of the test part
    images, kept_masks = SplitReader(index, split, 3, 0, tmp_path, decoded).load_segmentation("val", "selection")
    first = split.parts["val"][0]
    np.testing.assert_array_equal(images[0], decode_full(index.root / first))
    np.testing.assert_array_equal(kept_masks[0][0], decode_mask(index.root / rows.at[first, f"mask:{index.classes[0]}"]))


def test_every_image_gets_its_own_output_files():
    """`predict` and `explain` name their files by stem: names that share one (dots in the name, two folders) are numbered."""
    from tune_cells.output_files import unique_stems

    assert unique_stems(["slide.001.png", "slide.002.png"]) == ["slide.001", "slide.002"]
    assert unique_stems(["a/x.png", "b/x.png", "y.png"]) == ["0000_x", "0001_x", "0002_y"]
    assert unique_stems(["slide.001", "slide.002"]) == ["0000_slide", "0001_slide"]


def test_ray_memory_for_lung_counts_every_field_at_its_own_size(tmp_path):
    """Ray's shared memory holds every training and validation field and its masks: sized by each
    field's own header, not the first field's times the count (a small first field undersized it)."""
    from types import SimpleNamespace

    from tune_cells.kinds import SEGMENTATION

    index = import_lung_masks(write_lung(tmp_path / "lung", sizes=((20, 10), (300, 200), (60, 40))))
    split = SimpleNamespace(parts={"train": ["train/Original/im0.jpg", "train/Original/im1.jpg"],
                                   "val": ["train/Original/im2.jpg"], "test": []})
    assert SEGMENTATION.object_store_bytes(None, index, split, 0) == (20 * 10 + 300 * 200 + 60 * 40) * (3 + 2)
