"""Search against a fixed recipe at equal wall time (issue #15): does the default search earn its cost?

    .venv/bin/python bench/bench_recipe.py nuclei --data ../shared/data/nuclei --samples 6 --max-epochs 10 --grace-period 4
    .venv/bin/python bench/bench_recipe.py nuclei --data ../shared/data/nuclei --search-workdir DIR   # reuse a search

Two arms on the same data, split and seed, each run as a user runs it (`tune-cells search`, whose
wall time includes the preflight, promotion and the fresh-process evaluation):

1. the default search of TASK with the given budget (or an earlier one, --search-workdir);
2. the fixed recipe, the default space's first initial point pinned, trained once with the whole
   machine (--cpus-per-trial = the CPU count) for as many epochs as fit in the search's wall time:
   a two-epoch probe of the recipe measures its epoch time (the second epoch's) and its fixed cost first.

Printed side by side: wall time, epochs, the validation metric that selected each champion, and the
test metrics with their 95 % CIs from each evaluation run; then the two champions image by image on
the same test images (McNemar's exact test): "beats" is a paired p < 0.05, not a higher point
estimate. Run it alone on the machine. --recipe-workdir reuses an earlier recipe arm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_args import bench_parser, quiet_mlflow  # a sibling script, not a package: its folder is on sys.path

TEST_METRICS = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc")


def run_with_one_line_errors(main) -> None:
    """`main()`, with a user's mistake (a missing folder, a bad layout) as one line and exit 2, as the
    CLI reports it, not a traceback: for the benches that read a dataset in their own process."""
    from tune_cells.errors import UserInputError

    try:
        main()
    except UserInputError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)


def recipe_space(task: str, space_name: str | None = None, point: dict | None = None) -> dict:
    """The task's default space (or `space_name`), as this machine can load it, with its first
    initial point (or `point`: a space without initial points, e.g. a from-scratch one) pinned."""
    from tune_cells.search_spaces import builtin_space_path, load_space
    from tune_cells.space_weights import fit_space_to_weights
    from tune_cells.tasks import get_task

    space = fit_space_to_weights(load_space(builtin_space_path(space_name or get_task(task).default_space)))
    if not point and not space.initial_points:
        sys.exit(f"{space.source}: no initial point to pin as the recipe (an A/B file can give one as `base`)")
    point, pinned = point or space.initial_points[0], {}
    for name in space.params:
        if name in space.fixed:
            pinned[name] = space.fixed[name]
        elif space.applies(name, pinned):
            if name not in point:
                sys.exit(f"{space.source}: its first initial point leaves '{name}' to the sampler")
            pinned[name] = point[name]
    # a given base may also set parameters the space leaves to their defaults (e.g. `stem`)
    pinned.update({name: value for name, value in point.items() if name not in space.params})
    return {"description": f"{space.name}'s first initial point, pinned (bench_recipe.py)", "params": pinned}


def search(args, workdir: Path, *flags) -> float:
    """`tune-cells search TASK ...` as a user runs it; its wall time in seconds."""
    data = ["--data", str(args.data)] if args.data else []
    command = [str(Path(sys.executable).with_name("tune-cells")), "search", args.task, *data,
               "--seed", str(args.seed), "--workdir", str(workdir), *map(str, flags)]
    print("$", " ".join(command), flush=True)
    started = time.time()
    with open(workdir.parent / f"{workdir.name}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"{' '.join(command)}: exit {code} (see {workdir.parent / workdir.name}.log)")
    wall = time.time() - started
    (workdir.parent / f"{workdir.name}.wall_s").write_text(f"{wall:.1f}\n")  # read back when the arm is reused
    return wall


def arm_wall_s(workdir: Path, stored: dict) -> tuple[float, str]:
    """An arm's wall time and what it covers: around its whole command when this bench ran it (the
    file `search` leaves beside it), else from its MLflow store (`stored`: its `summary`), which
    lacks the preflight and Ray's start."""
    measured = workdir.parent / f"{workdir.name}.wall_s"
    if measured.is_file():
        return float(measured.read_text()), "the whole command"
    return stored["stored_wall_s"], "search run to evaluation end"


def latest_search(workdir: Path):
    """(client, all runs newest first, the latest search run, its trial runs) of a working
    folder's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("tune_cells.run_type") == "search")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and r.data.tags.get("tune_cells.run_type") == "trial"]
    return client, runs, parent, trials


def champion_evaluation(workdir: Path, runs, parent):
    """The newest evaluation of the latest search's model (under its run; not a `--seeds` one)."""
    evaluation = next((r for r in runs if r.data.tags.get("tune_cells.run_type") == "evaluation"
                       and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                       and r.data.tags.get("evaluation_kind") != "seeds"), None)
    if evaluation is None:
        sys.exit(f"{workdir}: no evaluation of its latest search's model (did the search evaluate its champion?)")
    return evaluation


def champion_test_predictions(workdir: Path):
    """The per-image test predictions (`test_predictions.csv`) of the latest search's model, or None
    where its task keeps none (segmentation)."""
    import tempfile

    import pandas as pd
    from mlflow.exceptions import MlflowException

    client, runs, parent, _ = latest_search(workdir)
    evaluation = champion_evaluation(workdir, runs, parent)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            return pd.read_csv(client.download_artifacts(evaluation.info.run_id, "test_predictions.csv", scratch))
        except (MlflowException, OSError):
            return None


def paired_line(search_dir: Path, recipe_dir: Path) -> str:
    """The two champions image by image on the same test part: what one gets right that the other
    misses, and McNemar's exact p. "beats" needs p < 0.05, not a higher point estimate."""
    from tune_cells.analysis.metrics import paired_comparison

    searched, recipe = (champion_test_predictions(d) for d in (search_dir, recipe_dir))
    if searched is None or recipe is None:
        return "paired: no per-image test predictions in these stores (a segmentation task)"
    searched, recipe = searched.set_index("path"), recipe.set_index("path")
    if set(searched.index) != set(recipe.index):
        sys.exit(f"the two arms were tested on different images ({len(searched)} and {len(recipe)})")
    searched = searched.loc[recipe.index]
    paired = paired_comparison(searched.label == searched.predicted, recipe.label == recipe.predicted)
    verdict = ("no difference this test part can show" if paired["p"] >= 0.05
               else "the search beats the recipe" if paired["only_a"] > paired["only_b"] else "the recipe beats the search")
    return (f"paired on {paired['images']} test images: right only by the search {paired['only_a']}, "
            f"only by the recipe {paired['only_b']}; McNemar exact p = {paired['p']:.3f}: {verdict}")


def summary(workdir: Path, metric: str) -> dict:
    """From a working folder's MLflow store: the latest search's champion validation metric, epochs
    trained by all its trials, epoch times, and its model's evaluation (`champion_evaluation`)."""
    client, runs, parent, trials = latest_search(workdir)
    evaluation = champion_evaluation(workdir, runs, parent)
    epoch_times = [m.value for t in trials for m in client.get_metric_history(t.info.run_id, "epoch_time_s")]
    best = max((m.value for t in trials for m in client.get_metric_history(t.info.run_id, metric)), default=float("nan"))
    test = {k: (evaluation.data.metrics.get(k), evaluation.data.metrics.get(f"{k}_ci_low"),
                evaluation.data.metrics.get(f"{k}_ci_high")) for k in TEST_METRICS}
    return {"trials": len(trials), "epochs": len(epoch_times), "epoch_s": epoch_times, "metric": metric,
            "best_val": best, "test": test, "split": parent.data.tags.get("split_sha256", "")[:12],
            "seed": parent.data.params.get("seed"),
            "stored_wall_s": (evaluation.info.end_time - parent.info.start_time) / 1000.0}


def copy_split(source: Path, target: Path) -> None:
    """The recipe trains and is tested on exactly the search's split (the split files are editable
    JSON, read when present)."""
    (target / "splits").mkdir(parents=True, exist_ok=True)
    for path in (source / "splits").glob("*.json"):
        shutil.copy2(path, target / "splits" / path.name)


def main() -> None:
    parser = bench_parser(__doc__, "bench-recipe-runs", demo_data=True, workdir_help="where both arms are kept")
    parser.add_argument("task")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--grace-period", type=int, default=4)
    parser.add_argument("--search-workdir", type=Path, help="reuse this finished search (same data and seed) as arm 1")
    parser.add_argument("--recipe-workdir", type=Path,
                        help="reuse this finished recipe arm (an earlier run's WORKDIR/TASK/recipe) as arm 2")
    args = parser.parse_args()
    quiet_mlflow()
    root = args.workdir.resolve() / args.task
    root.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    from tune_cells.tasks import get_task

    metric = get_task(args.task).metric

    if args.search_workdir:
        search_dir = args.search_workdir.resolve()
    else:
        search_dir = root / "search"
        search(args, search_dir, "--samples", args.samples, "--max-epochs", args.max_epochs,
               "--grace-period", args.grace_period)
    searched = summary(search_dir, metric)
    search_wall, search_clock = arm_wall_s(search_dir, searched)

    if args.recipe_workdir:
        recipe_dir = args.recipe_workdir.resolve()
        recipe_note = "reused: trained for the wall time of the search it was first run against"
    else:
        recipe_dir, recipe_note = train_recipe(args, root, search_dir, search_wall, metric)
    recipe = summary(recipe_dir, metric)
    recipe_wall, recipe_clock = arm_wall_s(recipe_dir, recipe)
    epochs = len(recipe["epoch_s"])
    for key in ("split", "seed"):
        if recipe[key] != searched[key]:
            sys.exit(f"the recipe's {key} ({recipe[key]}) is not the search's ({searched[key]})")

    print(f"\ntune-cells search against the fixed recipe at equal wall time: {args.task}, {args.data}, seed {args.seed}, "
          f"split {searched['split']}, {cpus} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"recipe: {recipe_dir} ({recipe_note})")
    print(f"wall times cover: search {search_clock}; recipe {recipe_clock}")
    arms = {f"search ({searched['trials']} trials)": (search_wall, searched),
            f"recipe ({epochs} epochs)": (recipe_wall, recipe)}
    print(f"{'':<34}" + "".join(f"{name:>28}" for name in arms))
    print(f"{'wall time (s)':<34}" + "".join(f"{wall:>28.0f}" for wall, _ in arms.values()))
    print(f"{'epochs trained (all trials)':<34}" + "".join(f"{s['epochs']:>28}" for _, s in arms.values()))
    print(f"{'best ' + searched['metric']:<34}" + "".join(f"{s['best_val']:>28.4f}" for _, s in arms.values()))
    for key in TEST_METRICS:
        cells = []
        for _, s in arms.values():
            value, low, high = s["test"][key]
            cells.append("-" if value is None else f"{value:.4f} [{low:.3f}, {high:.3f}]")
        print(f"{key:<34}" + "".join(f"{c:>28}" for c in cells))
    print(f"search / recipe wall time: {search_wall / recipe_wall:.2f}")
    for key in TEST_METRICS[:2]:
        if searched["test"][key][0] is not None and recipe["test"][key][0] is not None:
            print(f"search - recipe, {key}: {100 * (searched['test'][key][0] - recipe['test'][key][0]):+.2f} pp")
    print(paired_line(search_dir, recipe_dir))


def train_recipe(args, root: Path, search_dir: Path, search_wall: float, metric: str) -> tuple[Path, str]:
    """The recipe trained once with the whole machine for as many epochs as fit in the search's
    wall time: (its working folder, how its epoch time was measured)."""
    cpus = os.cpu_count() or 1
    space_file = root / "recipe.yaml"
    space_file.write_text(yaml.safe_dump(recipe_space(args.task), sort_keys=False))
    probe_dir, recipe_dir = root / "recipe-probe", root / "recipe"
    for directory in (probe_dir, recipe_dir):
        shutil.rmtree(directory, ignore_errors=True)
        copy_split(search_dir, directory)
    # Two epochs: the first carries one-time costs (weights, first batches); the second is the rate.
    probe_wall = search(args, probe_dir, "--space", space_file, "--samples", 1, "--max-epochs", 2,
                        "--grace-period", 2, "--cpus-per-trial", cpus)
    probe_epochs = summary(probe_dir, metric)["epoch_s"]
    epoch_s = probe_epochs[-1]
    fixed_s = probe_wall - epoch_s * len(probe_epochs)  # the first epoch's one-time costs count here
    epochs = max(1, int((search_wall - fixed_s) // epoch_s))
    search(args, recipe_dir, "--space", space_file, "--samples", 1, "--max-epochs", epochs,
           "--grace-period", epochs, "--cpus-per-trial", cpus)
    return recipe_dir, f"{space_file}; an epoch with {cpus} CPUs: {epoch_s:.0f} s after the first, fixed cost {fixed_s:.0f} s"


if __name__ == "__main__":
    main()
