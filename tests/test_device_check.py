"""GPU-ready trials, checked on the CPU: the checkpoint policy (weights when the metric improves, the
whole trainer state every N epochs and at the last), a resume from either kind of checkpoint, and
the short form of the device check (`./run bench-device --quick`), which runs the trainer without Ray."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from test_trainables import CLASSIFIER, classification_data

from tune_cells.model_io import OPTIMIZER_FILE, TRAINER_FILE, WEIGHTS_FILE, load_trainer_state, strip_training_state
from tune_cells.trainables.classification import train_classifier
from tune_cells.trainables.skeleton import CheckpointPolicy, LocalSession

ROOT = Path(__file__).resolve().parents[1]


class RecordingSession(LocalSession):
    """A LocalSession that remembers which files each epoch's checkpoint held."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.written: list[set[str] | None] = []

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        self.written.append(None if checkpoint_dir is None else {p.name for p in Path(checkpoint_dir).iterdir()})


def test_the_policy_writes_weights_on_improvement_and_everything_every_n_epochs():
    policy = CheckpointPolicy("val_accuracy", "max", every=3, last_epoch=7)
    decisions = [policy.decide(epoch, {"val_accuracy": value})
                 for epoch, value in enumerate([0.5, 0.4, 0.45, 0.6, 0.6, 0.3, 0.2], start=1)]
    assert decisions == ["weights", None, "full", "weights", None, "full", "full"]
    assert policy.best == 0.6
    assert CheckpointPolicy("val_loss", "min", 5, 9).decide(1, {"val_loss": float("nan")}) is None


def test_epochs_not_offered_for_promotion_rank_below_every_offered_one():
    """A weight-averaging trial offers only its averages: Ray keeps and the search promotes by
    PROMOTION_SCORE, so a first-half epoch scoring 0.81 on two fields loses to an average at 0.79."""
    from tune_cells.promotion_rank import PROMOTION_SCORE, promotion_score
    from tune_cells.ray_checkpoints import best_kept_checkpoint

    policy = CheckpointPolicy("val_dice", "max", every=10, last_epoch=10)
    reports = [(0.81, False), (0.75, True), (0.79, True), (0.78, True)]
    scored = [{"val_dice": v, "training_iteration": e, PROMOTION_SCORE: promotion_score(v, "max", offered)}
              for e, (v, offered) in enumerate(reports, start=1)]
    assert [policy.decide(m["training_iteration"], m) for m in scored] == ["weights", "weights", "weights", None]
    best = best_kept_checkpoint([(f"ckpt-{m['training_iteration']}", m) for m in scored], "val_dice", "max")
    assert (best["best_checkpoint"], best["best_metric"], best["best_epoch"]) == ("ckpt-3", 0.79, 3)
    # a trial stopped before its first average is ranked by its metric; checkpoints of older trials have no score
    assert best_kept_checkpoint([("a", scored[0]), ("b", {"val_dice": 0.7, PROMOTION_SCORE: promotion_score(0.7, "max", False)})],
                    "val_dice", "max")["best_checkpoint"] == "a"
    assert best_kept_checkpoint([("a", {"val_loss": 0.3}), ("b", {"val_loss": 0.2})], "val_loss", "min")["best_checkpoint"] == "b"


def test_the_report_reads_a_trial_best_as_promotion_ranks_it():
    from tune_cells.promotion_rank import promoted_value

    values, flags = [0.81, 0.75, 0.79, float("nan")], [False, True, True, True]
    assert promoted_value(values, flags, "max") == 0.79  # the best average, not epoch 1's 0.81
    assert promoted_value(values[:1], flags[:1], "max") == 0.81  # stopped before its first average
    assert promoted_value([0.3, 0.2], None, "min") == 0.2  # older trials logged no flags: every epoch competed
    assert promoted_value([float("nan")], None, "max") != promoted_value([float("nan")], None, "max")  # NaN


def test_a_trial_checkpoints_by_the_policy_and_reports_the_bytes(tmp_path):
    session = RecordingSession(checkpoint_dir=tmp_path / "ckpt")
    data = replace(classification_data(4), metric="val_accuracy")
    train_classifier({**CLASSIFIER, "checkpoint_every": 2}, data, session)
    full = {WEIGHTS_FILE, TRAINER_FILE, OPTIMIZER_FILE, "model.json"}
    assert session.written[1] == full and session.written[3] == full  # epochs 2 and 4 (the last)
    assert session.written[0] == full - {OPTIMIZER_FILE}  # epoch 1 always improves: weights alone
    for files, result in zip(session.written, session.results):
        assert (result["checkpoint_mb"] > 0) == (files is not None)


def test_resume_from_a_weights_only_checkpoint_restarts_the_moments_and_says_so(tmp_path, caplog):
    first = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, classification_data(1), first)  # one epoch: the last, so a full one
    (tmp_path / "ckpt" / OPTIMIZER_FILE).unlink()  # as a checkpoint written for its weights alone
    resumed = LocalSession(checkpoint_dir=tmp_path / "again", resume_from=tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        train_classifier(CLASSIFIER, classification_data(3), resumed)
    assert len(resumed.results) == 2 and resumed.failure is None
    assert "optimiser's moments restart" in caplog.text
    assert load_trainer_state(tmp_path / "again")["best_promotion_score"] is not None


def test_a_registered_model_keeps_weights_and_spec_only(tmp_path):
    session = LocalSession(checkpoint_dir=tmp_path / "ckpt")
    train_classifier(CLASSIFIER, replace(classification_data(2), fold_of=None), session)
    strip_training_state(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {WEIGHTS_FILE, "model.json"}


@pytest.fixture
def bench_device(monkeypatch):
    # on sys.path, as when run as a script: its trial processes (spawned) import it by name
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("bench_device")


def test_the_device_check_short_form_prints_every_figure(bench_device, capsys):
    numbers = bench_device.main(["--quick", "--model", "small_convnet", "--train-images", "64", "--epochs", "2",
                                 "--processes", "1"])
    out = capsys.readouterr().out
    for line in ("device: CPU", "trial / bare:", "1 process(es):", "checkpoints:"):
        assert line in out, out
    assert numbers["trial"]["images_per_s"] > 0 and numbers["bare"]["images_per_s"] > 0
    # two epochs: weights after the first, everything after the last
    assert 0 < numbers["trial"]["checkpoint_mb_per_epoch"] < numbers["trial"]["full_checkpoint_mb"]


def test_the_device_check_runs_as_a_script_with_the_segmentation_step(tmp_path):
    """As a lent GPU machine runs it: the script by path, from outside the checkout, every step;
    step 4 builds the shipped lung space's trial, so a broken import there costs a device run."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_device.py"), "--quick", "--segmentation",
                           "--model", "small_convnet", "--train-images", "64", "--epochs", "2", "--processes", "1",
                           "--json", "numbers.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4. a U-Net trial" in done.stdout
    assert json.loads((tmp_path / "numbers.json").read_text())["segmentation"]["views_per_s"] > 0
