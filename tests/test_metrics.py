import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from tune_cells.analysis.metrics import bootstrap_intervals, classification_metrics, confusion, exact_accuracy_interval

CLASSES = ["a", "b c", "d"]


def predictions(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_metrics_agree_with_sklearn_and_names_are_safe():
    y, probs = predictions()
    m = classification_metrics(y, probs, CLASSES)
    pred = probs.argmax(1)
    assert m["test_accuracy"] == accuracy_score(y, pred)
    assert m["test_balanced_accuracy"] == balanced_accuracy_score(y, pred)
    assert np.isclose(m["test_macro_f1"], f1_score(y, pred, average="macro"))
    assert np.isclose(m["test_roc_auc"], roc_auc_score(y, probs, multi_class="ovr"))
    assert np.isclose(m["test_f1_b_c"], f1_score(y, pred, average=None)[1])
    assert confusion(y, probs, 3).sum() == len(y)


@pytest.mark.parametrize("n_classes,n,decimals,seed", [(2, 9, 1, 1), (2, 200, 2, 2), (4, 60, 1, 3), (4, 300, 6, 4),
                                                        (6, 40, 1, 5)])
def test_counted_metrics_equal_scikit_learns_with_ties_and_classes_never_predicted(n_classes, n, decimals, seed):
    """The NumPy metrics against scikit-learn's own: rounded scores tie, and a weak model on few
    images leaves classes never predicted (precision 0/0 and F1 read as 0, as zero_division=0)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])  # every class present
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 0.8
    if n_classes == 6:
        logits[:, 0] -= 10  # class 0 is never predicted
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), decimals)
    probs[:, -1] = 1 - probs[:, :-1].sum(1)  # rows still sum to 1, as scikit-learn's multi-class AUC asks
    classes = [f"c{k}" for k in range(n_classes)]
    pred = probs.argmax(1)
    ours = classification_metrics(y, probs, classes)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=list(range(n_classes)), zero_division=0)
    auc = roc_auc_score(y, probs[:, 1]) if n_classes == 2 else roc_auc_score(y, probs, multi_class="ovr")
    assert ours["test_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert ours["test_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert ours["test_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert ours["test_roc_auc"] == pytest.approx(auc, abs=1e-12)
    for k, name in enumerate(classes):
        assert (ours[f"test_precision_{name}"], ours[f"test_recall_{name}"], ours[f"test_f1_{name}"]) == pytest.approx(
            (precision[k], recall[k], f1[k]), abs=1e-12)
    assert (confusion(y, probs, n_classes) == confusion_matrix(y, pred, labels=list(range(n_classes)))).all()
    if n_classes == 6:
        assert precision[0] == f1[0] == 0 and not (pred == 0).any()


def test_binary_auc_uses_the_positive_class():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    assert classification_metrics(y, probs, ["normal", "blast"])["test_roc_auc"] == 1.0


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, probs = predictions()
    point = classification_metrics(y, probs, CLASSES)
    first = bootstrap_intervals(y, probs, CLASSES, n_boot=200, seed=1)
    assert first == bootstrap_intervals(y, probs, CLASSES, n_boot=200, seed=1)
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc"):
        low, high = first[key]
        assert low <= point[key] <= high and high - low > 0.02


def test_exact_interval_stays_honest_when_every_image_is_right():
    y = np.array([0, 1] * 13 + [0])  # 27 test images, all correct
    probs = np.eye(2)[y]
    assert bootstrap_intervals(y, probs, ["n", "b"], n_boot=100)["test_accuracy"] == (1.0, 1.0)
    low, high = exact_accuracy_interval(y, probs)
    assert high == 1.0 and 0.86 < low < 0.88  # Clopper-Pearson for 27/27: [0.872, 1]


def test_classes_absent_from_the_evaluated_set_get_no_per_class_scores():
    import numpy as np

    from tune_cells.analysis.metrics import classification_metrics

    y_true = np.array([0, 0, 1, 1])  # an external set without class 2
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    metrics = classification_metrics(y_true, probs, ["a", "b", "c"])
    assert "test_f1_c" not in metrics and "test_recall_c" not in metrics
    assert metrics["test_balanced_accuracy"] == 0.5 * (0.5 + 0.5)
    assert "test_f1_a" in metrics


def clustered_predictions(groups: int = 24, per_group: int = 8, seed: int = 0):
    """Images come in groups (one animal, a set of near-duplicates) that are right or wrong together."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, groups * per_group)
    right = np.repeat(rng.random(groups) < 0.7, per_group)
    probs = np.eye(2)[np.where(right, y, 1 - y)] * 0.8 + 0.1
    return y, probs, np.repeat([f"g{k}" for k in range(groups)], per_group)


def test_group_bootstrap_is_wider_on_clustered_data_and_equal_without_groups():
    y, probs, groups = clustered_predictions()
    by_image = bootstrap_intervals(y, probs, ["n", "b"], n_boot=200)
    by_group = bootstrap_intervals(y, probs, ["n", "b"], n_boot=200, groups=groups)
    for key in ("test_accuracy", "test_balanced_accuracy"):
        assert by_group[key][1] - by_group[key][0] >= by_image[key][1] - by_image[key][0], key
    width = by_group["test_accuracy"][1] - by_group["test_accuracy"][0]
    assert width > 1.5 * (by_image["test_accuracy"][1] - by_image["test_accuracy"][0])
    # every image its own group: exactly the per-image bootstrap
    singletons = [f"i{k}" for k in range(len(y))]
    assert bootstrap_intervals(y, probs, ["n", "b"], n_boot=200, groups=singletons) == by_image


def test_too_few_groups_give_no_interval_but_a_note():
    from tune_cells.analysis.evaluation import format_table
    from tune_cells.analysis.evaluation_common import Evaluation
    from tune_cells.analysis.metrics import too_few_groups
    from tune_cells.analysis.segmentation_evaluation import bootstrap_over_images

    y, probs, groups = clustered_predictions(groups=4)
    assert bootstrap_intervals(y, probs, ["n", "b"], n_boot=100, groups=groups) == {}
    note = too_few_groups(groups)
    assert "too few groups" in note and "4 groups" in note and too_few_groups(None) == ""
    assert "2 groups" in too_few_groups(["36", "39"])  # two animals of one field each: still too few

    rows = [{"image": i, "target": "t", "dice": d} for i, d in enumerate([0.9, 0.8, 0.7, 0.95, 0.5, 0.6])]
    assert bootstrap_over_images(rows, ["t"], 6, 100, groups=["a", "a", "b", "b", "b", "b"]) == {}
    wide = bootstrap_over_images(rows, ["t"], 6, 300, groups=["a", "a", "b", "c", "d", "e"])
    assert set(wide) == {"test_dice_t", "test_dice"} and wide != bootstrap_over_images(rows, ["t"], 6, 300)

    table = format_table(Evaluation("run", "models:/m@champion", "1", {"test_dice": 0.8}, {}, None, 3, ci_note=note))
    assert "none: too few groups" in table and "Too few groups for a bootstrap CI: the test part holds 4" in table


def test_the_exact_interval_is_left_out_where_images_come_in_groups():
    """Clopper-Pearson counts each image as an independent draw: on clustered data it is far narrower
    than the bootstrap over groups, which is the honest interval there."""
    from tune_cells.analysis.evaluation import format_table
    from tune_cells.analysis.evaluation_common import Evaluation

    y, probs, groups = clustered_predictions()
    low, high = exact_accuracy_interval(y, probs)
    by_group = bootstrap_intervals(y, probs, ["n", "b"], n_boot=200, groups=groups)["test_accuracy"]
    assert high - low < 0.7 * (by_group[1] - by_group[0])  # what it would have claimed
    assert exact_accuracy_interval(y, probs, groups=groups) is None
    singletons = [f"i{k}" for k in range(len(y))]  # every image its own group: independent after all
    assert exact_accuracy_interval(y, probs, groups=singletons) == (low, high)

    def table(exact):
        return format_table(Evaluation("run", "models:/m@champion", "1", {"test_accuracy": 0.7},
                                       {"test_accuracy": by_group}, exact, len(y)))

    assert "exact binomial" not in table(None) and "exact binomial" in table((low, high))


@pytest.mark.slow  # (two evaluation runs, ~6 s each)
def test_evaluate_prints_and_logs_no_exact_interval_for_grouped_images(run_cli, tmp_path, capsys):
    from PIL import Image

    from conftest import FORMAT1_MODEL, register_model_folder, store_client

    workdir = tmp_path / "work"
    workdir.mkdir()
    register_model_folder(workdir, FORMAT1_MODEL, name="tune-cells-folder", alias="champion", task="folder")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{k}.png")
    capsys.readouterr()
    outputs = []
    for grouped in (False, True):
        if grouped:  # six animals of two images each
            (tmp_path / "data" / "groups.csv").write_text("path,group\n" + "".join(
                f"{name}/{k}.png,animal{k}\n" for name in ("a", "b") for k in range(6)))
        result = run_cli("evaluate", "folder", "--data", tmp_path / "data", "--workdir", workdir, "--bootstrap", 50)
        assert result.code == 0, result.err
        outputs.append(result.out)
    assert "(exact binomial CI)" in outputs[0] and "(exact binomial CI)" not in outputs[1], outputs
    runs = store_client(workdir / "mlflow.db").search_runs(
        [store_client(workdir / "mlflow.db").get_experiment_by_name("tune-cells-folder").experiment_id],
        order_by=["attributes.start_time ASC"])
    assert ["test_accuracy_exact_ci_low" in run.data.metrics for run in runs] == [True, False]
    assert "test_accuracy_ci_low" in runs[1].data.metrics  # the bootstrap over the six groups stays


def test_paired_comparison_counts_only_discordant_images_and_is_mcnemars_exact_test():
    from scipy.stats import binomtest

    from tune_cells.analysis.metrics import paired_comparison

    # hep2's stored arms (session 10): 2,175 cells, 5 right only by the search, 16 only by the recipe
    both_right, both_wrong = 2175 - 5 - 16 - 28, 28
    search = np.array([True] * both_right + [False] * both_wrong + [True] * 5 + [False] * 16)
    recipe = np.array([True] * both_right + [False] * both_wrong + [False] * 5 + [True] * 16)
    paired = paired_comparison(search, recipe)
    assert (paired["images"], paired["only_a"], paired["only_b"]) == (2175, 5, 16)
    assert paired["p"] == binomtest(5, 21, 0.5).pvalue and 0.02 < paired["p"] < 0.03
    # the images both get right or wrong change nothing; no discordant image is no evidence at all
    assert paired_comparison(search[-21:], recipe[-21:])["p"] == paired["p"]
    assert paired_comparison(search, search)["p"] == 1.0
    # 2 errors in 397 (nuclei's recipe): even a perfect rival cannot be shown better on this test part
    assert paired_comparison(np.ones(397, bool), np.r_[np.ones(395, bool), np.zeros(2, bool)])["p"] == 0.5


def test_a_resample_without_a_rare_class_does_not_score_it_zero():
    """A perfect model on 49/49/2 images: about 13 % of resamples draw neither image of the rare
    class; scoring its recall 0 there put balanced accuracy's interval at [0.67, 1] (a read-only
    audit, session 20). Averaged over the classes each resample holds, as sklearn does: [1, 1]."""
    y = np.array([0] * 49 + [1] * 49 + [2] * 2)
    probs = np.eye(3)[y] * 0.85 + 0.05  # rows sum to 1
    intervals = bootstrap_intervals(y, probs, ["a", "b", "c"], n_boot=300, seed=0)
    assert intervals["test_balanced_accuracy"] == (1.0, 1.0) and intervals["test_macro_f1"] == (1.0, 1.0)
    assert intervals["test_recall_c"] == (1.0, 1.0)
