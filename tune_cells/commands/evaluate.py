"""`tune-cells evaluate`: a registered model on its held-out test part (or `--data`), or with
`--seeds K` beside its configuration retrained under K new seeds."""

from __future__ import annotations

from pathlib import Path

import click

from tune_cells.commands.opening import open_registered_model
from tune_cells.commands.options import tracking_option, workdir_option
from tune_cells.errors import UserInputError

MAX_BOOTSTRAP = 100_000
MAX_SEEDS = 50


@click.command("evaluate")
@click.argument("task")
@click.option("--model-uri", default=None, help="Model to evaluate [default: models:/tune-cells-TASK@champion].")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True, help="Bootstrap resamples for CIs.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="An external test set in the task's layout: every image is scored (classes matched by name).")
@click.option("--seeds", type=int, default=None,
              help="Also retrain the champion's configuration under K new seeds and report mean ± sd of each test "
                   "metric beside the champion's bootstrap CI (K full trainings).")
@click.option("--address", default=None, help="--seeds: Ray cluster address, to retrain where the search ran.")
@click.option("--cpus-per-trial", type=float, default=None, help="--seeds: CPUs per retrain [1].")
@click.option("--gpus-per-trial", type=float, default=None, help="--seeds: GPUs per retrain [the model's share].")
@click.option("--storage", default=None,
              help="--seeds: Ray storage path or URI for the retrains [WORKDIR/ray/seeds]; shared (s3://, NFS) on a "
                   "multi-node cluster, as a search's --storage.")
@workdir_option
@tracking_option
def command(task, model_uri, n_boot, data, seeds, address, cpus_per_trial, gpus_per_trial, storage, workdir,
            tracking_uri):
    """Evaluate a registered TASK model on its held-out test part and log an evaluation run."""
    from tune_cells.lock import WorkdirLock
    from tune_cells.preflight import check_workdir

    if not 1 <= n_boot <= MAX_BOOTSTRAP:
        raise UserInputError(f"--bootstrap {n_boot}: must be 1 to {MAX_BOOTSTRAP} (10,000 already fixes a 95 % CI's "
                             "bounds to about 0.1 point)")
    if seeds is not None and not 2 <= seeds <= MAX_SEEDS:
        raise UserInputError(f"--seeds {seeds}: must be 2 (a spread needs two retrains) to {MAX_SEEDS} (each is a "
                             "full training)")
    if seeds is not None and data is not None:
        raise UserInputError("--seeds retrains on the model's own split: it does not combine with --data")
    retraining = {"--storage": storage, "--address": address, "--cpus-per-trial": cpus_per_trial,
                  "--gpus-per-trial": gpus_per_trial}
    given = [flag for flag, value in retraining.items() if value is not None]
    if seeds is None and given:
        raise UserInputError(f"{given[0]} is for the retrains of --seeds: give --seeds K too")
    if seeds is not None:  # as a search checks them: Ray fails late on both, or retries for minutes
        from tune_cells.ray_places import check_ray_address, check_storage, storage_for_ray

        check_ray_address(address)
        check_storage(storage)
        storage = storage and storage_for_ray(storage)
    with WorkdirLock(check_workdir(workdir), "evaluate"):  # the lock first: a second writer is refused at once
        model = open_registered_model(task, workdir, tracking_uri, model_uri)
        _evaluate(model.task, model.tracker, model.uri, model.workdir, n_boot, data, seeds,
                  (address, cpus_per_trial, gpus_per_trial, storage))


def _evaluate(spec, tracker, model_uri: str, workdir, n_boot: int, data, seeds,
              placement=(None, None, None, None)) -> None:
    from tune_cells.analysis.evaluation import evaluate_registered, format_table

    if seeds is not None:
        from tune_cells.analysis.seeds import evaluate_seeds, format_seeds_table

        result = evaluate_seeds(spec, tracker, model_uri, workdir, seeds, n_boot, *placement)
        click.echo(f"\nSeeds evaluation {result.run_id} of {model_uri}: the champion, and its configuration "
                   f"retrained under seeds {', '.join(map(str, result.seeds))}, on the held-out test images:")
        click.echo(format_seeds_table(result))
        return
    result = evaluate_registered(spec, tracker, model_uri, workdir, n_boot=n_boot, external=data)
    where = f"images of {data}" if data else "held-out test images"
    click.echo(f"\nEvaluation {result.run_id} of {result.model_uri} (version {result.version}) "
               f"on {result.n_images} {where}:")
    click.echo(format_table(result))
