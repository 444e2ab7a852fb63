"""`tune-cells evaluate TASK --seeds K`: how much of the champion's score is its configuration, and
how much its luck. The champion's configuration (an ensemble: each of its networks') is retrained
K times under new seeds (same split, same epochs, same best-epoch rule, the same choices on
validation at promotion: thresholds, temperature, test-time augmentation), each retrained model is
scored on the test part, and mean ± sd is reported beside the champion's own score and bootstrap CI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tune_cells.data.reader import SplitReader
from tune_cells.errors import UserInputError
from tune_cells.logged_runs import LoggedSearch, LoggedVersion
from tune_cells.paths import WorkDir


@dataclass
class SeedsEvaluation:
    run_id: str
    table: pd.DataFrame  # metric, champion, ci_low, ci_high, mean, sd, seed_<n>...
    seeds: list[int]
    ci_note: str = ""  # why the champion has no bootstrap CI (too few test groups)
    failed: dict[int, str] = field(default_factory=dict)  # seed → why its retrain failed (not in the mean)


def evaluate_seeds(task, tracker, model_uri: str, workdir: Path, k: int, n_boot: int = 1000,
                   address: str | None = None, cpus_per_trial: float | None = None,
                   gpus_per_trial: float | None = None, storage: str | None = None) -> SeedsEvaluation:
    """Retrain the champion's configuration under `k` new seeds where the champion trained: on a
    cluster (`address`, with a shared `storage` there) and on GPUs when there are any, with the
    search's per-trial resources."""
    from tune_cells import ray_backend, ray_seeds
    from tune_cells.analysis.evaluation import evaluation_experiment, model_split
    from tune_cells.analysis.seed_ensemble import member_seeds
    from tune_cells.data.splits import dataset_record
    from tune_cells.resources import check_local_resources, trial_resources
    from tune_cells.trial_recorder import SEEDS_EVALUATION, TrialRecorder, recording_retrains, retrain_runs_by_seed

    version = tracker.resolve_model(model_uri, task.name)
    lineage = LoggedVersion.of(version)
    champion, configs = _champion_and_member_configs(tracker, model_uri, lineage)
    parent_id = lineage.search_run_id
    if not parent_id:
        raise UserInputError(f"{model_uri} has no search run: --seeds needs the search it came from")
    parent = LoggedSearch.of(tracker.get_run(parent_id))
    experiment_id = evaluation_experiment(tracker, task, parent_id)  # deleted in the UI: refused before K retrains
    max_epochs, metric, mode = parent.max_epochs, parent.metric or task.metric, parent.mode or task.mode
    index, split = model_split(task, tracker, lineage, workdir)
    # decoded as the champion was trained (its spec records the size), so retrains and scores match it
    reader = SplitReader(index, split, task.channels, champion.spec.store_size, workdir)
    base = task.kind.parse_config(champion.spec.config, strict=False).seed or 0
    seeds = [base + 1000 + i for i in range(k)]  # new seeds, never the champion's own

    check_local_resources(cpus_per_trial, gpus_per_trial, address)
    cluster = ray_backend.init(address=address, num_cpus=None if address else os.cpu_count())
    try:
        folds = parent.folds  # a fold ensemble is retrained as one
        # an ensemble (`ensemble: N`) is retrained as one: N networks per seed, each of its member's configuration
        size = len(configs)
        members = {seed: [seed, *member_seeds(seed, size)] for seed in seeds}
        inputs = task.kind.trial_inputs(task, index, reader, max_epochs, split.seed, folds)
        with recording_retrains(TrialRecorder(
                tracker, experiment_id, parent_id, max_epochs, inputs.metric_keys,
                common_tags={"split_sha256": split.sha256}, summary_keys=inputs.summary_keys,
                source=f"tune-cells evaluate {task.name} --seeds {k}", dataset=dataset_record(index, split)),
                SEEDS_EVALUATION, {"retrain_of_model": f"models:/{version.name}/{version.version}",
                                   "retrain_of_trial_run_id": lineage.trial_run_id}) as retrain_recorder:
            name = f"seeds-{version.name}-v{version.version}-{time.strftime('%Y%m%d-%H%M%S')}"
            # one Tune run per distinct configuration: a seed ensemble's networks share one, a trial ensemble's not
            trained = ray_seeds.SeedRuns([])
            for i, member_config in enumerate(configs):
                if member_config in configs[:i]:
                    continue
                same = [j for j, other in enumerate(configs) if other == member_config]
                part = ray_seeds.run_seeds(
                    inputs.trainable, {"data": inputs.data}, member_config,
                    [members[seed][j] for seed in seeds for j in same], metric, mode,
                    trial_resources(cpus_per_trial, gpus_per_trial, address, cluster),
                    storage or str(WorkDir.at(workdir).seeds_storage), name + (f"-member{i}" if i else ""),
                    events=retrain_recorder, on_interrupt="evaluate has no --resume: run it again to retrain")
                trained = ray_seeds.SeedRuns(sorted([*trained.trained, *part.trained], key=lambda r: r.seed),
                                             {**trained.failed, **part.failed})
    finally:
        ray_backend.shutdown()
    # seed → each network's MLflow run (a retrained ensemble's members each have theirs)
    retrain_run_ids = retrain_runs_by_seed(tracker.get_run(run_id) for run_id in retrain_recorder.runs.values())
    # A seed whose retrain (or one of whose ensemble's) failed or diverged is reported, not scored:
    # the other seeds' training is kept. None trained: nothing to report.
    failed = _failed_seeds(members, trained.failed)
    if len(failed) == len(seeds):
        trained.raise_first_failure()
    kept = [seed for seed in seeds if seed not in failed]
    networks_kept = {m for seed in kept for m in members[seed]}
    trained_kept = [run for run in trained.trained if run.seed in networks_kept]
    runs = _as_ensembles(trained_kept, {seed: members[seed] for seed in kept}) if size > 1 else trained_kept
    for run in trained.trained:  # a failed seed's other members are not scored
        if run.seed not in networks_kept:
            shutil.rmtree(run.checkpoint, ignore_errors=True)

    scorer = task.kind.test_scorer(reader, n_boot)
    champion_scores, intervals = scorer.score(champion, with_intervals=True)
    # Each retrained model gets the champion's promotion steps, chosen on validation as its were (thresholds,
    # temperature, test-time augmentation; none under a latency budget that kept the champion from them).
    allow_tta = lineage.latency_budget_ms is None or champion.spec.tta != "none"
    for run in runs:
        task.kind.finalize(run.checkpoint, inputs.data, allow_tta=allow_tta)
    per_seed = [scorer.score(task.kind.load_predictor(run.checkpoint))[0] for run in runs]
    keys = [key for key in scorer.keys if key in champion_scores]
    table = pd.DataFrame({
        "metric": keys,
        "champion": [champion_scores[key] for key in keys],
        "ci_low": [intervals.get(key, (np.nan, np.nan))[0] for key in keys],
        "ci_high": [intervals.get(key, (np.nan, np.nan))[1] for key in keys],
        "mean": [float(np.mean([s[key] for s in per_seed])) for key in keys],
        "sd": [float(np.std([s[key] for s in per_seed], ddof=1)) if len(per_seed) > 1 else float("nan")
               for key in keys],
        **{f"seed_{run.seed}": [scores[key] for key in keys] for run, scores in zip(runs, per_seed)},
    })

    networks = sorted(retrain_run_ids)
    run_ids = ",".join(retrain_run_ids[seed] for seed in networks)
    if len(run_ids) > 8000:  # MLflow's longest tag: the retrains' own runs still say what they are
        run_ids = f"{len(networks)} runs, too many for a tag: the child runs tagged retrain_purpose={SEEDS_EVALUATION}"
    run_id = tracker.start_run(experiment_id, f"seeds-v{version.version}", "evaluation", parent_id,
                               tags={"model_uri": model_uri, "model_version": version.version, "task": task.name,
                                     "evaluation_data": "test", "evaluation_kind": "seeds",
                                     "retrain_seeds": ",".join(map(str, networks)),  # and their runs, in that order
                                     "retrain_run_ids": run_ids})
    try:
        tracker.log_params(run_id, {"model_uri": model_uri, "seeds": ",".join(map(str, seeds)), "retrains": k,
                                    "max_epochs": max_epochs, "split_sha256": split.sha256,
                                    "best_epochs": ",".join(str(r.best_epoch) for r in runs),
                                    "failed_seeds": ",".join(map(str, failed)) or "none"})
        if failed:
            tracker.set_tags(run_id, {"failed_retrains": "; ".join(f"seed {seed}: {why}"
                                                                   for seed, why in failed.items())[:5000]})
        tracker.log_metrics(run_id, {**{f"{m}_seed_mean": v for m, v in zip(table["metric"], table["mean"])},
                                     **{f"{m}_seed_sd": v for m, v in zip(table["metric"], table["sd"])}})
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "seeds.csv", index=False)
            tracker.log_artifact(run_id, Path(tmp) / "seeds.csv")
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    for run in runs:
        shutil.rmtree(run.checkpoint, ignore_errors=True)
    from tune_cells.analysis.metrics import too_few_groups

    return SeedsEvaluation(run_id, table, seeds, too_few_groups(scorer.groups), failed)


def _champion_and_member_configs(tracker, model_uri: str, lineage: LoggedVersion) -> tuple[object, list[dict]]:
    """The champion's predictor, and the configuration (without its seed) of each network a
    retrained model has: the champion's once, N times for an ensemble of retrains
    (`ensemble_seeds`), each member's for an ensemble of trials (`ensemble_trials`: read from the
    registered members' specs); from one download of the model."""
    from tune_cells.model_io import load_spec
    from tune_cells.tracking import model_checkpoint
    from tune_cells.tracking_registry import load_registered_predictor

    with tempfile.TemporaryDirectory(prefix="tune-cells-model-") as tmp:
        downloaded = tracker.download_model(model_uri, Path(tmp))
        champion = load_registered_predictor(downloaded, model_uri)
        if lineage.ensemble_trials:
            folder = model_checkpoint(downloaded, model_uri)
            specs = [load_spec(folder / member) for member in load_spec(folder).members]
        else:
            specs = [champion.spec] * max(1, len(lineage.ensemble_seeds))
    return champion, [{key: value for key, value in spec.config.items() if key != "seed"} for spec in specs]


def _failed_seeds(members: dict[int, list[int]], failed_networks: dict[int, str]) -> dict[int, str]:
    """Seed → why, for each seed whose network (or one of its ensemble's networks) failed."""
    failed = {}
    for seed, networks in members.items():
        reasons = [(network, failed_networks[network]) for network in networks if network in failed_networks]
        if reasons:
            failed[seed] = "; ".join(why if len(networks) == 1 else f"seed {network}: {why}" for network, why in reasons)
    return failed


def _as_ensembles(trained: list, members: dict[int, list[int]]) -> list:
    """Each seed's retrains joined into one ensemble (seed_ensemble.join), in the first's place."""
    from tune_cells.analysis.seed_ensemble import join, member_name

    by_seed = {run.seed: run for run in trained}
    joined = []
    for seed, seeds in members.items():
        first = by_seed[seed]
        folder = Path(tempfile.mkdtemp(prefix=f"tune-cells-ensemble-{seed}-"))  # removed with the runs
        join([(member_name(m), by_seed[m].checkpoint) for m in seeds], folder)
        joined.append(replace(first, checkpoint=folder))
    return joined


def format_seeds_table(result: SeedsEvaluation) -> str:
    scored = len(result.seeds) - len(result.failed)
    rows = [f"{'metric':<32}{'champion':>9}   {'95% CI (bootstrap)':<18}  mean ± sd over {scored} retrains"]
    for row in result.table.itertuples(index=False):
        interval = f"[{row.ci_low:.4f}, {row.ci_high:.4f}]" if np.isfinite(row.ci_low) else ""
        sd = f"{row.sd:.4f}" if np.isfinite(row.sd) else "n/a (one retrain)"
        rows.append(f"{row.metric:<32}{row.champion:>9.4f}   {interval:<18}  {row.mean:.4f} ± {sd}")
    if result.ci_note:
        rows.append(f"{result.ci_note[:1].upper()}{result.ci_note[1:]}.")
    for seed, why in result.failed.items():
        rows.append(f"The retrain under seed {seed} failed ({why}): not in the mean, which is over the {scored} "
                    f"of {len(result.seeds)} that trained.")
    return "\n".join(rows)
