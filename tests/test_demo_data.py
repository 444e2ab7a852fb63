import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tune_cells.data.demo import generate
from tune_cells.tasks import get_task


def test_demo_data_is_deterministic_and_in_the_kaggle_layout(tmp_path):
    first = generate(tmp_path / "a", counts=(3, 3, 3, 3))
    second = generate(tmp_path / "b", counts=(3, 3, 3, 3))
    assert (first / "train.csv").read_text() == (second / "train.csv").read_text()
    for name in ("1.png", "7.png"):
        assert (first / "train" / name).read_bytes() == (second / "train" / name).read_bytes()
    index = get_task("nuclei").importer(first)
    assert index.class_counts() == {"normal_epithelial": 3, "cancer_epithelial": 3, "muscle": 3, "immune": 3}
    assert Image.open(first / "train" / "1.png").size == (100, 100)


def test_mean_colour_alone_does_not_separate_the_demo_classes(tmp_path):
    root = generate(tmp_path / "demo")  # the default demo set
    table = pd.read_csv(root / "train.csv")
    colour = np.stack([np.asarray(Image.open(root / "train" / f)).reshape(-1, 3).mean(0) for f in table.Filename])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    score = cross_val_score(model, colour, table.Label, cv=5, scoring="balanced_accuracy").mean()
    assert score < 0.6
