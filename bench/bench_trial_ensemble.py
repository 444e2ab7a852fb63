"""Would averaging a finished search's trials beat its promoted trial? (issue #15 item 7)

    .venv/bin/python bench/bench_trial_ensemble.py nuclei tune-cells-runs

Reads a search's working folder as `tune-cells search` left it: its split file and the checkpoints
Ray kept for each trial. Each trial is represented by its checkpoint with the best validation
balanced accuracy; every subset of trials is scored as the mean of its members' probabilities
(dihedral test-time augmentation, no temperature), on validation (balanced accuracy, log loss: what
a selection could use) and on the test part (accuracy, balanced accuracy: what it would buy). Not
a product path: nothing is registered or logged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_recipe import run_with_one_line_errors  # noqa: E402  (a sibling script, not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task")
    parser.add_argument("workdir", type=Path, help="a finished search's --workdir")
    args = parser.parse_args()

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss

    from tune_cells.classifier import ImageClassifier
    from tune_cells.data.reader import SplitReader
    from tune_cells.data.splits import load_or_create_split
    from tune_cells.model_io import load_spec
    from tune_cells.tasks import get_task

    task = get_task(args.task)
    split_file = next((args.workdir / "splits").glob("*.json"), None)
    if split_file is None:
        raise SystemExit(f"{args.workdir}: no split file under splits/ (not a search's --workdir?)")
    document = json.loads(split_file.read_text())
    index = task.importer(Path(document["data_root"]))
    split = load_or_create_split(split_file, index, int(document["seed"]))
    checkpoints = sorted(p.parent for p in args.workdir.glob("ray/*/*/*/checkpoint_*/model.json"))
    if not checkpoints:
        raise SystemExit(f"{args.workdir}: no trial checkpoints under ray/")
    first = load_spec(checkpoints[0])
    reader = SplitReader(index, split, first.channels, first.store_size, args.workdir / "bench-trial-ensemble")
    val_x, val_y = reader.load("val", "bench: trial ensemble")
    test_x, test_y = reader.load("test", "bench: trial ensemble")
    best: dict[str, tuple] = {}
    for checkpoint in checkpoints:
        classifier = ImageClassifier.from_checkpoint(checkpoint)
        classifier.spec.tta = "dihedral"
        val_p, test_p = classifier.predict_proba(val_x, 1.0), classifier.predict_proba(test_x, 1.0)
        score = balanced_accuracy_score(val_y, val_p.argmax(1))
        trial = checkpoint.parent.name
        if trial not in best or score > best[trial][0]:
            best[trial] = (score, val_p, test_p)
    labels = range(best[next(iter(best))][1].shape[1])
    trials = sorted(best, key=lambda t: -best[t][0])
    print(f"{args.task}, {args.workdir}: {len(trials)} trials, {len(val_y)} validation and {len(test_y)} test images")
    print(f"{'members':<40}{'val bal. acc':>13}{'val log loss':>13}{'test acc':>10}{'test bal. acc':>14}")
    for size in range(1, len(trials) + 1):
        for members in itertools.combinations(trials, size):
            val_p = np.mean([best[t][1] for t in members], 0)
            test_p = np.mean([best[t][2] for t in members], 0)
            print(f"{' + '.join(members):<40}{balanced_accuracy_score(val_y, val_p.argmax(1)):>13.4f}"
                  f"{log_loss(val_y, val_p, labels=labels):>13.4f}{accuracy_score(test_y, test_p.argmax(1)):>10.4f}"
                  f"{balanced_accuracy_score(test_y, test_p.argmax(1)):>14.4f}")


if __name__ == "__main__":
    run_with_one_line_errors(main)
