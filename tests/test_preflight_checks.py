"""Preflight checks beside the bad-input corpus: how image paths are normalised."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from tune_cells.errors import UserInputError


def test_image_paths_are_normalised_and_may_pass_through_a_folder_inside(tmp_path):
    from tune_cells.data.images import ImageIndex

    (tmp_path / "train").mkdir()
    for name in ("1.png", "2.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / name)
    items = pd.DataFrame({"path": ["train/./1.png", "train/../train/2.png"], "label": [0, 1]})
    index = ImageIndex(root=tmp_path, items=items, classes=["a", "b"])
    assert list(index.items["path"]) == ["train/1.png", "train/../train/2.png"]
    with pytest.raises(UserInputError, match="one image listed twice, as train/1.png and train/../train/1.png"):
        ImageIndex(root=tmp_path, items=pd.DataFrame({"path": ["train/1.png", "train/../train/1.png"],
                                                      "label": [0, 1]}), classes=["a", "b"])
