"""Which weights of a segmentation trial to promote: its epoch that scored best on the validation fields
(what a search promotes today), its last epoch (what nnU-Net promotes), either with its
BatchNorm statistics recomputed over training views after every epoch (precise BN), or its weights averaged over the
second half of training with the same recomputation (SWA: at the last epoch, and at the validation-best of the
averaged epochs, as a trial with `swa_start: 0.5` promotes it, which the lung space ships since session 14); the precise-BN and SWA choices with test-time
augmentation (the mean over 8 flips and turns: always, or where validation gains; bench_thresholds.py reads
the rules at promotion's thresholds, and the augmentation always, which the lung spaces ship since session 15), scored on fields of animals that neither training nor validation
saw, over outer folds that together test every field once.

    .venv/bin/python bench/bench_last_epoch.py lung --data ../shared/data/lung --epochs 20 --folds 5

With two validation fields, the validation-best epoch is picked by the noise of two images (session
11's one draw: the recipe's epoch 5 scored 0.724 mean test Dice, its last epoch 0.757). Here the
fields are dealt into `--folds` folds by animal (group), balanced by field count; fold k tests,
fold k+1 validates, the others train, as bench_outer_folds.py deals them. The recipe (the default
space's first initial point) trains once per fold through the trainable a search runs; after
every epoch it is also scored on the test fields (read only, never selected on). Printed: per fold
the epoch each rule picks and its test Dice per target, then per-image test Dice pooled over all
folds for each rule, with the paired difference from today's rule. Thresholds stay at the recipe's (0.5). Run it
alone on the machine.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import bench_parser  # noqa: E402  (a sibling script, not a package)
from bench_old_code import Prepared, arm_results, recipe_setup  # noqa: E402
from bench_outer_folds import fold_parts  # noqa: E402
from bench_recipe import run_with_one_line_errors  # noqa: E402

AVERAGED_FROM = 0.5  # the bench averages weights as a trial with `swa_start: 0.5` does (the lung space's)


def balanced_group_folds(groups: dict[str, list[str]], folds: int, seed: int) -> list[list[str]]:
    """Groups (name -> paths) dealt into `folds` folds: the largest group first (ties in a seeded
    order) to the fold with the fewest paths so far."""
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    order = sorted(rng.permutation(len(names)), key=lambda i: -len(groups[names[i]]))
    dealt: list[list[str]] = [[] for _ in range(folds)]
    for i in order:
        min(dealt, key=len).extend(groups[names[i]])
    return [sorted(fold) for fold in dealt]


def test_scoring_trainer(test_images, test_masks, swa_lr: float | None = None, keep_probabilities: Path | None = None):
    """The task's segmentation trainer, also scoring the test fields after each epoch (`test_` keys),
    and keeping an equal average of its weights after each epoch of the second half (stochastic
    weight averaging through the trainer's own `WeightAverage`), scored after each of those epochs
    (`swa_` keys) once its BatchNorm statistics are recomputed on training views. `keep_probabilities`: an
    .npz of the promoted average's probability maps on the validation and test fields, with and without
    test-time augmentation (`bench_thresholds.py` reads threshold rules from them)."""
    from tune_cells.analysis.segmentation_metrics import segmentation_scores
    from tune_cells.config import first_averaged_epoch
    from tune_cells.segmentation import predict_logits_tiled, rescale_image, rescale_masks
    from tune_cells.trainables.segmentation import SegmentationTrainer
    from tune_cells.training import WeightAverage, recompute_batchnorm

    class TestScoringTrainer(SegmentationTrainer):
        """Validates with training's running statistics (the recipe's `batchnorm_views` set to 0 and
        `swa_start` to None); the `bn_` and `swa_` arms recompute them over the views a trial with 96 would
        use. `self.epoch` is set by the trainer skeleton."""

        bench_average = None
        # the weights of the validation-best epoch so far: with precise BN, and of the averaged epochs (swa_start 0.5)
        best_bn, best_bn_score, best_swa, best_swa_score = None, -np.inf, None, -np.inf

        def score(self, model, images, masks, prefix, dihedral=False):
            probabilities = [predict_logits_tiled(model, image, self.eval_preset, self.tile, self.config.overlap,
                                                  self.device, precision=self.precision, dihedral=dihedral).sigmoid()
                             .numpy() for image in images]
            if keep_probabilities is not None and prefix in ("swa_best_val_", "swa_best_test_", "swatta_val_",
                                                             "swatta_test_"):
                self.kept.update({f"{prefix}{i}": p.astype(np.float16) for i, p in enumerate(probabilities)})
            predicted = [p > self.config.threshold for p in probabilities]
            scores, rows = segmentation_scores(masks, predicted, list(self.data.targets), prefix)
            return {**scores, **{f"{prefix}image_dice_{t}": [r["dice"] for r in rows if r["target"] == t]
                                 for t in self.data.targets}}

        def held_lr(self):  # the averaging is the bench's own (swa_start None), from the same epoch
            return None if swa_lr is None else (first_averaged_epoch(AVERAGED_FROM, self.data.max_epochs), swa_lr)

        def validate(self) -> dict[str, float]:
            scores = super().validate()
            if self.epoch == 1:  # at the trial's working scale, once
                self.test_images = [rescale_image(i, self.config.scale) for i in test_images]
                self.test_masks = [rescale_masks(m, self.config.scale) for m in test_masks]
            images, masks = self.test_images, self.test_masks
            scores.update(self.score(self.model, images, masks, "test_"))
            weights = {"bn_": copy.deepcopy(self.model)}  # precise BN, every epoch: it can change the best epoch
            if self.epoch >= first_averaged_epoch(AVERAGED_FROM, self.data.max_epochs):  # as a trial with swa_start 0.5
                self.bench_average = self.bench_average or WeightAverage(self.model)
                self.bench_average.add(self.model)
                weights["swa_"] = copy.deepcopy(self.bench_average.model)
            for prefix, model in weights.items():
                model = self.with_fresh_batchnorm(model)
                scores.update(self.score(model, self.val_images, self.val_masks, f"{prefix}val_"))
                scores.update(self.score(model, images, masks, f"{prefix}test_"))
            metric = self.data.metric
            if scores[f"bn_{metric}"] > self.best_bn_score:
                self.best_bn, self.best_bn_score = weights["bn_"], scores[f"bn_{metric}"]
            if "swa_" in weights and scores[f"swa_{metric}"] > self.best_swa_score:
                self.best_swa, self.best_swa_score = weights["swa_"], scores[f"swa_{metric}"]
            if self.epoch == self.data.max_epochs:  # test-time augmentation of what each rule promotes
                self.kept = {}
                for arm, model in (("tta_", self.best_bn), ("swatta_", self.best_swa)):
                    for part, fields in (("val_", (self.val_images, self.val_masks)), ("test_", (images, masks))):
                        scores.update(self.score(model, *fields, f"{arm}{part}", dihedral=True))
                if keep_probabilities is not None:  # the promoted average's maps, for threshold rules read later
                    for part, fields in (("val_", (self.val_images, self.val_masks)), ("test_", (images, masks))):
                        self.score(self.best_swa, *fields, f"swa_best_{part}")
                        self.kept.update({f"{part}mask_{i}": m for i, m in enumerate(fields[1])})
                    np.savez_compressed(keep_probabilities, **self.kept)
            return scores

        def with_fresh_batchnorm(self, model):
            """`model` with BatchNorm statistics recomputed as a trial with `batchnorm_views: 96` does."""
            with self.precision.autocast(self.device):
                recompute_batchnorm(model, self.batchnorm_batches(96))
            model.eval()
            return model

    return TestScoringTrainer


def fold_run(setup, parts: dict[str, list[str]], epochs: int, seed: int, workdir: Path,
             swa_lr: float | None = None) -> list[dict]:
    from tune_cells.data.reader import SplitReader
    from tune_cells.trainables.segmentation import SegmentationData
    from tune_cells.trainables.skeleton import run_trial

    task, index = setup.task, setup.index
    reader = SplitReader(index, dataclasses.replace(setup.split, parts=parts), task.channels, setup.size, workdir)
    inputs = task.kind.trial_inputs(task, index, reader, epochs, seed)
    if not isinstance(inputs.data, SegmentationData):
        sys.exit(f"{task.name}: not a segmentation task; this bench compares epochs of segmentation trials")
    test_images, test_masks = reader.load_segmentation("test", "bench: scored each epoch, never selected on")
    trainer = test_scoring_trainer(test_images, test_masks, swa_lr, workdir / "probabilities.npz")
    trainable = lambda config, data, session: run_trial(trainer, config, data, session)  # noqa: E731
    return arm_results(Prepared(task, setup.config, dataclasses.replace(inputs, trainable=trainable)), None)


def recipe_changes(parser, pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs as recipe parameters (values read as YAML), refused by name where the
    bench sets the key itself or reads the rule itself (thresholds, test-time augmentation)."""
    import yaml

    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--set {pair}: expected KEY=VALUE")
        if key == "swa_lr":
            parser.error("--set swa_lr: use --swa-lr (the bench averages weights itself)")
        if key in ("batchnorm_views", "swa_start", "seed"):
            parser.error(f"--set {key}: the bench sets it itself (each arm is read from the same run)")
        if key in ("threshold", "threshold_choice", "tta_choice"):
            parser.error(f"--set {key}: the bench scores every arm at 0.5 and reads promotion's rules itself "
                         "(bench_thresholds.py)")
        changes[key] = yaml.safe_load(value)
    return changes


def main() -> None:
    from tune_cells.config import first_averaged_epoch

    parser = bench_parser(__doc__, "bench-last-epoch-runs")
    parser.add_argument("task")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", type=int, nargs="+", metavar="K",
                        help="run these outer folds only (the deal is the same; each fold prints its per-field scores)")
    parser.add_argument("--space", metavar="NAME", help="the recipe of this space (its first initial point) "
                        "[default: the task's default space]")
    parser.add_argument("--swa-lr", type=float, metavar="F",
                        help="from the first averaged epoch the learning rate holds at lr x F (as `swa_lr`), "
                             "so every arm's epochs past the half train at it")
    parser.add_argument("--deal-seed", type=int, metavar="S",
                        help="deal the fields into folds with this seed [default: --seed], so runs of two training "
                             "seeds share their folds and their maps average as one split's ensemble would")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="changes",
                        help="change one of the recipe's parameters for every arm (a YAML value), e.g. "
                             "--set scale=1.0 --set tile_size=256: full resolution with the same working view")
    parser.add_argument("--train-on-validation", action="store_true",
                        help="train on the validation fields too (a refit on all development fields, as a final "
                             "model would be); validation scores are then read on fields it trained on, so compare "
                             "the test fields at 0.5")
    args = parser.parse_args()
    if args.folds < 3:
        parser.error(f"--folds {args.folds}: at least 3 (a test, a validation and a training fold)")
    if any(not 0 <= k < args.folds for k in args.only or []):
        parser.error(f"--only {' '.join(map(str, args.only))}: folds are numbered 0 to {args.folds - 1}")

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # batchnorm_views 0: the running statistics of training are one of the arms (the lung spaces set 96); the
    # bench averages weights itself (swa_start None: the trainer validates and checkpoints the trained weights)
    changes = recipe_changes(parser, args.changes)
    setup = recipe_setup(args.task, args.data, args.workdir, args.seed,
                         {**changes, "batchnorm_views": 0, "swa_start": None, "swa_lr": None}, args.space)
    # a misspelt --set key would otherwise be dropped by the trial's lenient parse and the run look valid
    setup.task.kind.parse_config(setup.config, strict=True, source="--set")
    items = setup.index.items
    group_of = items["group"].fillna(items["path"]) if "group" in items.columns else items["path"]
    groups = {str(g): sorted(items.loc[group_of == g, "path"]) for g in group_of.unique()}
    if len(groups) < args.folds:
        sys.exit(f"--folds {args.folds}: {args.data} has {len(groups)} groups (animals); at most that many folds")
    deal_seed = args.seed if args.deal_seed is None else args.deal_seed
    folds = balanced_group_folds(groups, args.folds, deal_seed)
    metric, targets = setup.task.metric, list(setup.index.classes)
    rules = ("validation-best epoch", "last epoch", "validation-best epoch, BatchNorm statistics recomputed",
             "last epoch, BatchNorm statistics recomputed",
             "weights averaged over the second half, BatchNorm statistics recomputed",
             "validation-best epoch, BatchNorm statistics recomputed, test-time augmentation",
             "validation-best epoch, BatchNorm statistics recomputed, test-time augmentation where validation gains",
             "validation-best of the averaged epochs, as a trial with swa_start 0.5 promotes it",
             "the same, test-time augmentation where validation gains (what the lung space promoted in session 14)")
    picked: dict[str, dict[str, list[float]]] = {rule: {t: [] for t in targets} for rule in rules}
    lines = []
    for k in args.only if args.only is not None else range(args.folds):
        parts = fold_parts(folds, k)
        if args.train_on_validation:
            parts = {**parts, "train": sorted(parts["train"] + parts["val"])}
        reports = fold_run(setup, parts, args.epochs, args.seed, args.workdir / f"fold-{k}", args.swa_lr)
        # every epoch's scores, for rules read later without training again
        (args.workdir / f"fold-{k}" / "reports.json").write_text(json.dumps(reports, default=float))
        values = [r[metric] for r in reports]
        best = int(np.argmax(values))  # the first best, as the checkpoint policy keeps it
        best_bn = int(np.argmax([r[f"bn_{metric}"] for r in reports]))
        half = first_averaged_epoch(AVERAGED_FROM, args.epochs) - 1  # index of the first average: the first best of them is promoted
        best_swa = half + int(np.argmax([r[f"swa_{metric}"] for r in reports[half:]]))
        # test-time augmentation as promotion chooses it (there at each target's chosen threshold; here at 0.5)
        gains = reports[-1][f"tta_{metric}"] > reports[best_bn][f"bn_{metric}"]
        swa_gains = reports[-1][f"swatta_{metric}"] > reports[best_swa][f"swa_{metric}"]
        read = ((best, ""), (-1, ""), (best_bn, "bn_"), (-1, "bn_"), (-1, "swa_"), (-1, "tta_"),
                (-1, "tta_") if gains else (best_bn, "bn_"), (best_swa, "swa_"),
                (-1, "swatta_") if swa_gains else (best_swa, "swa_"))  # each rule's (epoch, arm), in order
        for rule, (epoch, arm) in zip(rules, read, strict=True):
            for t in targets:
                picked[rule][t].extend(reports[epoch][f"{arm}test_image_dice_{t}"])
        lines.append(f"fold {k} (test {', '.join(Path(p).stem for p in parts['test'])}): {metric} best at epoch "
                     f"{best + 1} ({values[best]:.3f}), last {values[-1]:.3f}; test Dice "
                     + "; ".join(f"{t} {reports[best][f'test_dice_{t}']:.3f} -> {reports[-1][f'test_dice_{t}']:.3f}"
                                 for t in targets)
                     + "".join(f"; {name}: {metric} {reports[-1][f'{p}{metric}']:.3f}, test Dice "
                               + "; ".join(f"{t} {reports[-1][f'{p}test_dice_{t}']:.3f}" for t in targets)
                               for name, p in (("last, fresh BatchNorm", "bn_"), ("averaged", "swa_")))
                     + f"; with fresh BatchNorm, {metric} best at epoch {best_bn + 1}, test Dice "
                     + "; ".join(f"{t} {reports[best_bn][f'bn_test_dice_{t}']:.3f}" for t in targets)
                     + f"; with test-time augmentation, {metric} {reports[-1][f'tta_{metric}']:.3f}, test Dice "
                     + "; ".join(f"{t} {reports[-1][f'tta_test_dice_{t}']:.3f}" for t in targets)
                     + f"; averaged epochs, {metric} best at epoch {best_swa + 1} "
                     + f"({reports[best_swa][f'swa_{metric}']:.3f}), test Dice "
                     + "; ".join(f"{t} {reports[best_swa][f'swa_test_dice_{t}']:.3f}" for t in targets)
                     + f", with test-time augmentation {metric} {reports[-1][f'swatta_{metric}']:.3f}")
        print(lines[-1], flush=True)
        for rule in rules:
            print(f"  {rule}, per test field: " + "; ".join(
                f"{t} {' '.join(f'{v:.3f}' for v in picked[rule][t][-len(parts['test']):])}" for t in targets))
        for p, name in (("", "test"), ("bn_", "test, fresh BatchNorm,"), ("swa_", "test, averaged from the half,")):
            print(f"  {name} mean Dice per epoch: " + " ".join(
                f"{np.mean([r[f'{p}test_dice_{t}'] for t in targets]):.3f}" for r in reports if f"{p}{metric}" in r),
                flush=True)

    variant = "" if args.swa_lr is None else f", the rate held at lr x {args.swa_lr} over the averaged epochs"
    variant += "".join(f", {key} {value}" for key, value in changes.items())
    variant += ", trained on the validation fields too" if args.train_on_validation else ""
    print(f"\n{setup.task.name} ({args.data}), the recipe of {args.space or 'the default space'}{variant}, seed {args.seed}{'' if deal_seed == args.seed else f' (folds dealt with seed {deal_seed})'}, {args.epochs} epochs, {args.folds} outer "
          f"folds by group; wall {time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}")
    print("\n".join(lines))
    for t in targets:
        best = np.array(picked[rules[0]][t])
        print(f"{t}: per-image test Dice over {len(best)} fields: "
              + ", ".join(f"{rule} {np.mean(picked[rule][t]):.4f}" for rule in rules))
        for rule in rules[1:]:
            diff = np.array(picked[rule][t]) - best
            print(f"  {rule} - validation-best epoch: {diff.mean():+.4f} (higher on {int((diff > 0).sum())}, "
                  f"lower on {int((diff < 0).sum())} fields)")


if __name__ == "__main__":
    run_with_one_line_errors(main)
