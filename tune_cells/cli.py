"""The `tune-cells` command line. Thin: each command parses flags and calls one function.

Exit codes: 0 success, 2 bad input (one line on stderr naming the culprit), 1 runtime failure.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import click

from tune_cells.commands import register_commands
from tune_cells.errors import Interrupted, UserInputError, first_line
from tune_cells.redact import CredentialFilter, without_credentials

log = logging.getLogger("tune_cells")
_CREDENTIAL_FILTER = CredentialFilter()  # on every log handler: no password of a URI reaches a log

from tune_cells.commands.opening import open_registered_model, require_store  # noqa: E402
from tune_cells.commands.options import tracking_option, workdir_option  # noqa: E402
from tune_cells.search_options import SMOKE_TEST, SearchOptions, check_options  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(package_name="tune-cells")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Hyperparameter search for microscopy cell-image models (Ray Tune + Optuna + ASHA + MLflow)."""
    # Set before MLflow is imported: it configures its own loggers and progress bars at import.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints a URL for every run it ends on a server: the tracking URI, with its password.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    ctx.obj = {"verbose": verbose}
    # SIGTERM ends a command like Ctrl-C does (runs end KILLED, locks are released), not at once.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CREDENTIAL_FILTER)  # one instance: adding it again is a no-op
    for noisy in ("alembic", "mlflow", "urllib3", "ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


@cli.command()
@click.argument("task")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Dataset folder in the task's layout (see `tune-cells tasks`). Without it: generated demo data.")
@click.option("--samples", type=int, default=SearchOptions.samples, show_default=True, help="Number of trials.")
@click.option("--max-epochs", type=int, default=SearchOptions.max_epochs, show_default=True, help="Epochs of a trial that ASHA never stops.")
@click.option("--grace-period", type=int, default=SearchOptions.grace_period, show_default=True, help="ASHA: epochs before a trial can be stopped.")
@click.option("--reduction-factor", type=int, default=SearchOptions.reduction_factor, show_default=True, help="ASHA: keep the top 1/N at each rung.")
@click.option("--cpus-per-trial", type=float, default=None,
              help="CPUs per trial (also its torch threads) [default: 1].")
@click.option("--gpus-per-trial", type=float, default=None,
              help="GPUs per trial; fractions share a GPU [default: the model's share (0.25 for small models) "
                   "where the cluster has GPUs, else 0]. Without CUDA a trial trains on the CPU.")
@click.option("--max-concurrent", type=int, default=None, help="At most this many trials at once.")
@click.option("--seed", type=int, default=SearchOptions.seed, show_default=True, help="Seeds the split, the sampler and the trials.")
@click.option("--folds", type=int, default=SearchOptions.folds, show_default=True,
              help="K > 1: cross-validation inside the search. Train and validation parts are pooled and cut into K "
                   "folds; each trial trains K models and reports their mean; the champion is the K-model ensemble.")
@click.option("--group-pattern", default=None, metavar="REGEX",
              help="Related images (one animal, patient, specimen) share a split part: the group of an image is "
                   "REGEX's first capture group (or whole match) in its path relative to --data. Replaces the "
                   "layout's own key (lung: the animal) and the folder task's groups.csv; used for a new split.")
@click.option("--space", type=click.Path(path_type=Path), default=None, help="Search-space YAML replacing the task's.")
@click.option("--experiment", default=None, help="MLflow experiment [default: tune-cells-TASK].")
@workdir_option
@tracking_option
@click.option("--storage", default=None, help="Ray storage path or URI [default: WORKDIR/ray/EXPERIMENT].")
@click.option("--address", default=None, help="Ray cluster address (auto or HOST:PORT) [default: a local Ray].")
@click.option("--max-latency-ms", type=float, default=None, help="Promote the best trial whose latency per image "
              "is at most this, measured after the search on the CPU (where predict, serve and evaluate run the "
              "model, also when trials trained on a GPU); `report` shows the trade-off.")
@click.option("--max-store-size", type=int, default=None, metavar="PX",
              help="Largest side images are decoded to and held in memory at (they are decoded at their native size "
                   "up to this) [default: the task's; 256 for every classification task].")
@click.option("--time-budget", type=float, default=None, metavar="MIN",
              help="Minutes of trials: then every running trial stops at its last reported epoch and none starts; "
                   "the champion is promoted from what was reported. The preflight before and the evaluation after "
                   "are not counted. A trial it stops has not finished its learning-rate schedule.")
@click.option("--no-evaluate", is_flag=True, help="Promote but do not evaluate on the test part.")
@click.option("--smoke-test", is_flag=True, help=f"Tiny run ({SMOKE_TEST['samples']} trials, {SMOKE_TEST['max_epochs']} epochs) to check the "
              "installation.")
@click.option("--resume", is_flag=True,
              help="Continue the experiment's latest interrupted search (same flags): its Optuna state, trials from "
                   "their last checkpoints, the same MLflow parent and trial runs (ASHA's rungs start afresh: Ray "
                   "does not keep them).")
@click.option("--warm-start", is_flag=True, help="Start from the finished trials (and scores) of the experiment's earlier "
              "searches of the same space: the sampler gets them before the first new trial.")
@click.pass_context
def search(ctx, task, data, samples, max_epochs, grace_period, reduction_factor, cpus_per_trial, gpus_per_trial,
           max_concurrent, seed, folds, group_pattern, space, experiment, workdir, tracking_uri, storage, address,
           no_evaluate, smoke_test, resume, warm_start, max_latency_ms, max_store_size, time_budget):
    """Search hyperparameters for TASK, promote the best model, evaluate it on the held-out test part."""
    if smoke_test:
        samples, max_epochs, grace_period = SMOKE_TEST["samples"], SMOKE_TEST["max_epochs"], SMOKE_TEST["grace_period"]
    opts = SearchOptions(
        task=task, data=data, samples=samples, max_epochs=max_epochs, grace_period=grace_period,
        reduction_factor=reduction_factor, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, seed=seed,
        experiment=experiment, workdir=workdir, tracking_uri=tracking_uri, storage=storage, space=space,
        address=address, max_concurrent=max_concurrent, verbose=ctx.obj["verbose"], resume=resume, folds=folds,
        group_pattern=group_pattern, warm_start=warm_start, max_latency_ms=max_latency_ms,
        max_store_size=max_store_size, time_budget=time_budget,
    )
    check_options(opts)  # before the seconds of imports below: a mistyped option answers at once
    from tune_cells.analysis.promotion import evaluate_in_fresh_process
    from tune_cells.search import run_search
    from tune_cells.tracking import resolve_tracking_uri

    outcome = run_search(opts)
    config = ", ".join(f"{k}={_short(v)}" for k, v in sorted(outcome.best_config.items()))
    click.echo(f"\nSearch {outcome.parent_run_id} in experiment {outcome.experiment}: {outcome.trials} trials "
               f"({outcome.stopped_early} stopped early by ASHA, "
               + (f"{outcome.stopped_by_budget} by the time budget, " if time_budget else "")
               + f"{outcome.failed_trials} failed) in {outcome.wall_time_s:.0f} s")
    click.echo(f"{'Promoted' if outcome.selection_note else 'Best'} trial {outcome.best_trial_id}: {outcome.metric} {outcome.best_metric:.4f} at epoch "
               f"{outcome.best_epoch}" + (f", {outcome.latency_note}" if outcome.latency_note else "") + f"\n  {config}")
    if outcome.selection_note:
        click.echo(f"  ({outcome.selection_note})")
    why = outcome.decision.reason.partition(": ")[2]
    if outcome.decision.champion:
        click.echo(f"Promoted: models:/{outcome.model_name}@champion (version {outcome.model_version}): {why}")
    else:
        click.echo(f"Registered version {outcome.model_version} as models:/{outcome.model_name}@challenger: {why}")
    click.echo(f"Pinned best configuration: {outcome.best_config_file} (rerun it with --space)")
    if not no_evaluate:
        code = evaluate_in_fresh_process(outcome)
        if code != 0:
            raise RuntimeError(f"evaluation of version {outcome.model_version} failed (exit {code})")
    if outcome.tracking_uri == resolve_tracking_uri(None, outcome.workdir):
        click.echo(f"\nBrowse the runs: tune-cells ui --workdir {workdir}")
    elif outcome.tracking_uri.startswith(("http:", "https:")):
        click.echo(f"\nBrowse the runs: {without_credentials(outcome.tracking_uri)}")
    else:
        click.echo(f"\nBrowse the runs: mlflow ui --backend-store-uri {without_credentials(outcome.tracking_uri)}")


@cli.command()
@click.argument("task")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model-uri", default=None, help="Model to use [default: models:/tune-cells-TASK@champion].")
@click.option("--output", type=click.Path(path_type=str), default=None,  # as typed: see check_new_file
              help="CSV to write [default: WORKDIR/predictions/TASK-<time>.csv, numbered -2, -3, ... where that is "
                   "taken]; an existing file is not overwritten.")
@workdir_option
@tracking_option
def predict(task, paths, model_uri, output, workdir, tracking_uri):
    """Predict images (files or folders) with TASK's champion: a CSV of classes and probabilities, or
    for segmentation of pixel counts per target, with masks and overlays in a folder beside it."""
    from tune_cells.output_files import claimed, default_output_name, output_names
    from tune_cells.predict import collect_images, predict_files

    files = collect_images(paths)
    # Reads only (a store shared read-only works); it writes just the CSV, checked next.
    model = open_registered_model(task, workdir, tracking_uri, model_uri, writes=False)
    spec = model.task
    masks = "-masks" if spec.kind.writes_masks else ""
    names = output_names(output, model.workdir.predictions(spec.name), masks,  # before any image is predicted
                         default_output_name(model.workdir.root, "predictions"))
    with claimed(names, masks) as (output, mask_dir):  # a failure leaves neither
        table = predict_files(model.tracker, model.uri, spec, files, mask_dir)
        table.to_csv(output, index=False)
    click.echo(table.to_string(index=False, max_rows=20, float_format=lambda v: f"{v:.4f}"))
    click.echo(f"\n{len(table)} predictions of {model.uri} written to {output}")
    if spec.kind.writes_masks:
        click.echo(f"masks and overlays: {mask_dir}")


@cli.command()
@click.argument("task")
@click.option("--model-uri", default=None, help="Model to serve [default: models:/tune-cells-TASK@champion].")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you mean it.")
@click.option("--allow-path-root", type=click.Path(path_type=Path), default=None,
              help="Let requests name image files (the `path` column) inside this folder [default: no `path`].")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host header to answer besides loopback and --host (repeatable), e.g. this machine's name.")
@workdir_option
@tracking_option
def serve(task, model_uri, port, host, allow_path_root, allowed_hosts, workdir, tracking_uri):
    """Serve TASK's champion over REST with MLflow's scoring app (POST /invocations)."""
    from tune_cells.listening import base_url, check_listen
    from tune_cells.path_access import allowed_root
    from tune_cells.serving import answered_hosts, build_app, load_served_model, run_server

    hosts = answered_hosts(host, allowed_hosts)  # exit 2 now for a bad --allowed-host
    check_listen(host, port)  # before the model loads: a port in use is one line, not a late exit 1
    if allow_path_root is not None and not allow_path_root.is_dir():
        raise UserInputError(f"--allow-path-root {allow_path_root}: not a folder")
    # Opened (and resolved) here: exit 2 now rather than a server that cannot start. It writes nothing.
    opened = open_registered_model(task, workdir, tracking_uri, model_uri, writes=False)
    path_root = allowed_root(allow_path_root) if allow_path_root is not None else None
    model = load_served_model(opened.tracker, opened.uri, path_root)
    paths = f"`path` rows under {path_root}" if path_root else "no `path` rows"
    click.echo(f"Serving {opened.uri} (version {opened.version.version}) on {base_url(host, port)}/invocations, "
               f"{paths} (Ctrl-C stops it)")
    run_server(build_app(model, hosts), host, port)


@cli.command()
@click.option("--experiment", default=None, help="Report this experiment's latest search [default: the store's latest].")
@click.option("--run-id", default=None, help="Report this search (its parent run id).")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Folder for the report [default: WORKDIR/reports/SEARCH].")
@workdir_option
@tracking_option
def report(experiment, run_id, output, workdir, tracking_uri):
    """Trials table, learning curves, best-so-far, parameter importance and parallel coordinates of
    a search, as PNGs, a CSV and one HTML page (also logged to the search's run)."""
    from tune_cells.analysis.report import build_report, check_output
    from tune_cells.preflight import check_workdir
    from tune_cells.tracking import Tracker, resolve_tracking_uri

    if output is not None:
        check_output(output)
    workdir = check_workdir(workdir)
    tracker = Tracker(resolve_tracking_uri(tracking_uri, workdir), workdir.artifacts)
    require_store(tracker, workdir)
    result = build_report(tracker, experiment, run_id, output, workdir)
    trials = result.trials
    by_budget = int(trials["stopped_by_time_budget"].sum())
    click.echo(f"Search {result.search_name} ({result.parent_run_id}): {len(trials)} trials, "
               f"{int(trials['stopped_early'].sum())} stopped early, "
               + (f"{by_budget} stopped by the time budget, " if by_budget else "")
               + f"{int((trials['status'] == 'FAILED').sum())} failed")
    if not result.importance.empty:
        top = ", ".join(f"{k} {v:.2f}" for k, v in result.importance.sort_values(ascending=False).head(5).items())
        click.echo(f"Parameter importance: {top}")
    click.echo(f"Report: {result.folder / 'report.html'} (also logged to the search run under report/)")


@cli.command()
@click.argument("task")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model-uri", default=None, help="Model to explain [default: models:/tune-cells-TASK@champion].")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Folder for the image grids [default: a new WORKDIR/explanations/TASK-<time>, numbered -2, -3, "
                   "... where that is taken]; an existing file is not overwritten.")
@click.option("--steps", type=int, default=32, show_default=True, help="Integration steps of integrated gradients.")
@workdir_option
@tracking_option
def explain(task, paths, model_uri, output, steps, workdir, tracking_uri):
    """Captum attribution maps (integrated gradients, noise tunnel, occlusion) of TASK's champion for
    images (files or folders): one PNG grid per image."""
    from tune_cells.analysis.explain import explain_image
    from tune_cells.output_files import default_output_name, output_folder, refuse_existing, unique_stems
    from tune_cells.predict import collect_images, decode_files

    if steps < 2:
        raise UserInputError(f"--steps {steps}: must be at least 2")
    files = collect_images(paths)
    model = open_registered_model(task, workdir, tracking_uri, model_uri, writes=False)  # reads (as predict)
    spec = model.task
    if not spec.kind.explainable:
        raise UserInputError(f"explain supports classification tasks; {task} is {spec.kind.name} "
                             "(its masks and overlays come from `tune-cells predict`)")
    # Before any work: the folder can take files, and none of the grids would replace one. The default
    # folder is named by the second: one of another explain of that second is passed over, never shared.
    with output_folder(output, model.workdir.explanations(spec.name),
                       default_output_name(model.workdir.root, "explanations")) as output:
        figures = [output / f"{stem}_attributions.png" for stem in unique_stems([f.name for f in files])]
        for figure in figures:
            refuse_existing(figure)
        classifier = model.tracker.load_classifier(model.uri)
        images = decode_files(classifier, files)  # every input, before the first grid is written
        output.mkdir(parents=True, exist_ok=True)
        for file, image, figure in zip(files, images, figures):
            shown = explain_image(classifier, image, file.name, figure, steps)
            click.echo(f"{file}: {shown['predicted_class']} (p={shown['probability']:.4f}) -> {shown['figure']}")
    click.echo(f"\n{len(files)} attribution grids of {model.uri} in {output}")


@cli.command()
def tasks():
    """List the tasks, their data layout, metric and default search space."""
    from tune_cells.search_spaces import builtin_space_path
    from tune_cells.tasks import get_task, task_names

    for name in task_names():
        spec = get_task(name)
        decode = (f"native size within {spec.min_store_size}-{spec.max_store_size} px" if spec.max_store_size
                  else "each image's own size")
        click.echo(f"{name}: {spec.description}\n  layout: {spec.layout}\n  metric: {spec.metric} ({spec.mode})"
                   f"\n  decode: {decode}\n  space:  {builtin_space_path(spec.default_space)}")


@cli.command()
@click.argument("task")
@click.argument("version")
@click.option("--model-name", default=None, help="Registered model [default: tune-cells-TASK, else tune-cells-TASK-demo].")
@workdir_option
@tracking_option
def promote(task, version, model_name, workdir, tracking_uri):
    """Make VERSION of TASK's registered model the champion by hand (the search's rule moves it only
    when a new version is better on the same validation data); logged on the version."""
    from tune_cells.analysis.promotion import promote_by_hand
    from tune_cells.lock import WorkdirLock
    from tune_cells.preflight import check_workdir

    with WorkdirLock(check_workdir(workdir), "promote"):
        if model_name is not None:
            model = open_registered_model(task, workdir, tracking_uri, f"models:/{model_name}/{version}")
        else:
            model = open_registered_model(task, workdir, tracking_uri, version=version)
        name, version = model.version.name, str(model.version.version)  # as registered: "01" is version 1
        previous = promote_by_hand(model.tracker, name, version)
    was = " already" if previous == version else f" (was {previous})" if previous else ""
    click.echo(f"models:/{name}@champion is version {version}{was}")


@cli.command()
@click.argument("task")
def params(task):
    """List every searchable parameter of TASK with its default: the trainer's, then each model's."""
    from tune_cells.config import parameter_table
    from tune_cells.tasks import get_task

    kind = get_task(task).kind
    click.echo(f"{task} ({kind.name}): parameters a search space may set\n")
    click.echo(parameter_table(kind.config_type, kind.name))


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt into Abort
        cause = exc.__cause__
        click.echo(f"tune-cells: {'interrupted' if cause else 'aborted'}", err=True)
        sys.exit(cause.exit_code if isinstance(cause, Interrupted) else 130)
    except click.ClickException as exc:  # usage errors: one line, not click's usage block
        click.echo(f"tune-cells: error: {_joined(without_credentials(exc.format_message()))}", err=True)
        sys.exit(2)
    except UserInputError as exc:  # (a library's message may quote a URI with its password)
        click.echo(f"tune-cells: error: {_joined(without_credentials(str(exc)))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        click.echo("tune-cells: interrupted", err=True)
        sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 130)
    except Exception as exc:
        log.debug("traceback", exc_info=True)
        name = _undecodable_name(exc)
        if name is not None:  # a name given or found that no checked path caught: still bad input
            from tune_cells.paths import shown_name

            click.echo(f"tune-cells: error: {_joined(shown_name(name))}: a name that is not UTF-8 text; rename it",
                       err=True)
            sys.exit(2)
        click.echo(f"tune-cells: failed: {type(exc).__name__}: {first_line(without_credentials(str(exc)))} (run with "
                   "-v for the traceback)", err=True)
        sys.exit(1)


def _undecodable_name(exc: BaseException | None) -> str | None:
    """The text whose bytes were no UTF-8 (Python holds them as lone surrogates) where an encoder met
    it, also under a library's own exception (MLflow wraps it); None for any other failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str) and "surrogates" in exc.reason:
            return exc.object
        exc = exc.__cause__ or exc.__context__
    return None


MAX_ERROR_CHARS = 2000  # a message quoting a value (a YAML alias can expand to gigabytes) is cut there


def _joined(message: str) -> str:
    """Our own message on one line, should a quoted name or a library's reason hold a line break."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + " (...)"


register_commands(cli)  # the commands that live in tune_cells.commands
