"""`tune-cells report`: one search's trials as a table, plots and an HTML page, from what MLflow holds.

Everything is rebuilt from the tracking store (the search's parent run, its trial runs and their
metric histories), so a report can be made for any past search, on any machine that sees the store.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tune_cells.analysis import search_plots
from tune_cells.errors import UserInputError
from tune_cells.logged_runs import RUN_TYPE_TAG, LoggedSearch, LoggedTrial
from tune_cells.output_files import check_output_folder
from tune_cells.paths import WorkDir
from tune_cells.promotion_rank import OFFERED_FOR_PROMOTION, promoted_value

log = logging.getLogger(__name__)


@dataclass
class Report:
    parent_run_id: str
    search_name: str
    folder: Path
    trials: pd.DataFrame
    importance: pd.Series
    files: list[Path]


REPORT_PAGE = "report.html"


def build_report(tracker, experiment: str | None, run_id: str | None, output: Path | None, workdir: Path) -> Report:
    from tune_cells.tracking_registry import require_local_artifacts

    run = _search_run(tracker, experiment, run_id)
    # The report is logged with the search: not into the old place of a working folder that moved.
    require_local_artifacts(run.info.artifact_uri, f"search {run.info.run_name}")
    parent = LoggedSearch.of(run)
    metric, mode = parent.metric or "val_balanced_accuracy", parent.mode or "max"
    name = parent.name
    folder = Path(output) if output else WorkDir.at(workdir).report(name)
    runs = tracker.trial_children(parent.experiment_id, parent.run_id)
    if not runs:
        raise UserInputError(f"search {name} has no trial runs to report")
    folder.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    rows, curves = [], []
    for run in runs:
        logged = LoggedTrial.of(run)
        trial = logged.ray_trial_id or run.info.run_id[:8]
        history = tracker.metric_history(run.info.run_id, metric)
        values = pd.Series([m.value for m in history], dtype=float)
        # the epochs that competed for promotion (a weight-averaging trial's averages); none logged: all did
        flags = {m.step: m.value > 0 for m in tracker.metric_history(run.info.run_id, OFFERED_FOR_PROMOTION)}
        curves += [{"trial": trial, "epoch": m.step, "value": m.value} for m in history]
        rows.append({
            "trial": trial, "run_id": run.info.run_id, "status": run.info.status,
            "start_time": run.info.start_time, "epochs": len(history),
            "stopped_early": logged.stopped_early, "stopped_by_time_budget": logged.stopped_by_time_budget,
            "best_value": promoted_value(list(values), [flags.get(m.step, True) for m in history], mode),
            "last_value": values.iloc[-1] if len(values) else float("nan"),
            "failure": logged.failure, "champion": trial == parent.best_trial_id,
            "latency_ms_per_image": run.data.metrics.get("latency_ms_per_image", float("nan")),
            "latency_device": logged.latency_device,  # a number means little without it
            "param_count": run.data.metrics.get("param_count", float("nan")),
            **{f"param_{k}": _number(v) for k, v in run.data.params.items()},
        })
    trials = pd.DataFrame(rows).sort_values("start_time").reset_index(drop=True)
    trials.insert(0, "number", range(1, len(trials) + 1))
    trials["param_count"] = trials["param_count"].round().astype("Int64")  # NaN: not measured
    curves = pd.DataFrame(curves, columns=["trial", "epoch", "value"])
    space = _logged_space(tracker, parent.run_id)
    searched = [p for p, spec in space.get("params", {}).items() if isinstance(spec, (dict, list))]
    importance = param_importance(trials, space, searched, mode)

    plotted = trials.rename(columns={f"param_{p}": p for p in searched})
    files = [
        search_plots.learning_curves(curves, trials, metric, folder / "learning_curves.png"),
        search_plots.best_so_far(trials.dropna(subset=["best_value"]), metric, mode, folder / "best_so_far.png"),
        search_plots.importance_bars(importance, metric, folder / "param_importance.png"),
        search_plots.parallel_coordinates(plotted.dropna(subset=["best_value"]), searched, metric, mode,
                                          folder / "parallel_coordinates.png"),
        search_plots.pareto_front(trials, metric, mode, parent.latency_protocol or "", folder / "pareto_front.png",
                                  parent.latency_budget_ms),
    ]
    trials.to_csv(folder / "trials.csv", index=False)
    importance.rename("importance").to_csv(folder / "param_importance.csv", index_label="param")
    files += [folder / "trials.csv", folder / "param_importance.csv"]
    page = _html_page(name, parent, metric, mode, trials, importance, searched)
    (folder / REPORT_PAGE).write_text(page)
    files.append(folder / REPORT_PAGE)
    for file in files:  # the report's own files: never whatever else the folder holds
        tracker.log_artifact(parent.run_id, file, "report")
    return Report(parent.run_id, name, folder, trials, importance, files)


def check_output(folder: Path) -> None:
    """A report writes fixed names (trials.csv, report.html, figures): into a new or empty folder, or
    over an earlier report, never among a user's other files."""
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"--output {folder}: a file; give a folder for the report")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / REPORT_PAGE).exists():
        raise UserInputError(f"--output {folder}: holds other files and no report; give a new or empty folder "
                             "(the report writes trials.csv, report.html and its figures there)")
    check_output_folder(folder)


def _search_run(tracker, experiment: str | None, run_id: str | None):
    if not tracker.store_exists():
        raise UserInputError(f"no MLflow store at {tracker.tracking_uri}: run a search first")
    if run_id:
        run = tracker.find_run(run_id)
        if run is None:
            raise UserInputError(f"--run-id {run_id}: no such run in {tracker.tracking_uri}")
        if run.data.tags.get(RUN_TYPE_TAG) != "search":
            raise UserInputError(f"run {run_id} is not a search (parent) run")
        return run
    run = tracker.latest_search(experiment) if experiment else tracker.latest_search_anywhere()
    if run is None:
        raise UserInputError(f"no search in {'experiment ' + experiment if experiment else tracker.tracking_uri}")
    return run


def _logged_space(tracker, run_id: str) -> dict:
    text = tracker.artifact_text(run_id, "search_space.yaml")  # None: an older run; importance is skipped
    return (yaml.safe_load(text) or {}) if text else {}


def param_importance(trials: pd.DataFrame, space: dict, searched: list[str], mode: str) -> pd.Series:
    """Optuna's fANOVA importance on a study rebuilt from the finished trials: each trial's values
    are replayed through the search space, so Optuna sees the real distributions (log, ranges)."""
    import optuna

    from tune_cells.search_spaces import SearchSpace

    done = trials[trials["status"] == "FINISHED"].dropna(subset=["best_value"])
    if len(done) < 3 or not searched:
        return pd.Series(dtype=float)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # One distribution per parameter: a per-case one (`lr` per optimiser) is replayed as one range over its cases.
    function = SearchSpace(params=space["params"], source="logged space").merged()
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in done.iterrows():
        values = {p: row[f"param_{p}"] for p in searched if f"param_{p}" in row and pd.notna(row[f"param_{p}"])}
        study.enqueue_trial(values, skip_if_exists=False)
        trial = study.ask()
        function(trial)
        study.tell(trial, float(row["best_value"]))
    try:
        importance = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter varied
        log.warning("parameter importance skipped: %s", exc)
        return pd.Series(dtype=float)
    return pd.Series(importance, dtype=float)


def _number(value: str):
    """An MLflow param (always a string) back as the bool, int or float it was logged from."""
    if value in ("True", "False"):
        return value == "True"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value) else number


def _html_page(name: str, parent: LoggedSearch, metric: str, mode: str, trials: pd.DataFrame,
               importance: pd.Series, searched: list[str]) -> str:
    columns = ["number", "trial", "status", "epochs", "stopped_early", "stopped_by_time_budget", "best_value",
               "last_value", "champion", "latency_ms_per_image", "latency_device", "param_count",
               *[f"param_{p}" for p in searched if f"param_{p}" in trials], "failure"]
    table = trials[columns].rename(columns={"best_value": f"best {metric}", "last_value": f"last {metric}"})
    by_budget = int(trials["stopped_by_time_budget"].sum())
    summary = (f"{len(trials)} trials, {int(trials['stopped_early'].sum())} stopped early by ASHA, "
               + (f"{by_budget} by the time budget, " if by_budget else "") +
               f"{int((trials['status'] == 'FAILED').sum())} failed. Champion: trial {parent.best_trial_id or '?'} "
               f"(model version {parent.model_version or '?'}), {mode} {metric}.")
    figures = "".join(f'<figure><img src="{f}" alt="{f}"><figcaption>{f}</figcaption></figure>' for f in
                      ("learning_curves.png", "best_so_far.png", "param_importance.png", "parallel_coordinates.png",
                       "pareto_front.png"))
    ranked = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in importance.sort_values(ascending=False).items())
    budget = f"{parent.latency_budget_ms:g} ms" if parent.latency_budget_ms is not None else "none"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tune-cells report: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} figure{{display:inline-block;margin:.5em}}
img{{max-width:560px;border:1px solid #ddd}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} tr:nth-child(even){{background:#f6f6f6}}</style></head>
<body><h1>Search {html.escape(name)}</h1>
<p>Experiment run {html.escape(parent.run_id)}; task {html.escape(parent.task or '?')}. {html.escape(summary)}</p>
<p>Parameter importance: {ranked or 'not computed (too few finished trials)'}</p>
<p>Latency: {html.escape(parent.latency_protocol or 'not measured (a search before latency was measured)')};
budget: {html.escape(budget)}.</p>
{figures}
<h2>Trials</h2>
<p>best {html.escape(metric)}: over the epochs each trial offered for promotion (a weight-averaging trial offers
only its averages; the learning curves show every epoch).</p>
{table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True)}
</body></html>
"""
