"""A model card: its facts (analysis/model_card.py reads them from MLflow) and its Markdown."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tune_cells.analysis.selection import is_rule_note
from tune_cells.config import first_averaged_epoch

if TYPE_CHECKING:
    from tune_cells.kinds.base import CardWording

HEADLINE = ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc", "test_dice",
            "test_pooled_dice", "test_jaccard")
CALIBRATION = ("test_ece_before_temperature", "test_ece")
_INTERVAL_SUFFIXES = ("_ci_low", "_ci_high", "_exact_ci_low", "_exact_ci_high")
REFERENCES = ["Mitchell et al., Model Cards for Model Reporting, FAT* 2019, https://arxiv.org/abs/1810.03993",
              "MONAI Bundle metadata, https://docs.monai.io/en/stable/mb_specification.html"]


@dataclass
class CardFacts:
    """What a card says, as MLflow holds it."""

    task: str
    task_description: str
    model_name: str
    version: str
    version_tags: dict[str, str]
    evaluation_run_id: str
    evaluation_time: str  # ISO, UTC
    metrics: dict[str, float]  # the evaluation run's, exactly as logged
    evaluation_params: dict[str, str]
    search_run_id: str
    search_name: str
    search_params: dict[str, str]
    search_metrics: dict[str, float]
    search_seconds: float | None
    data: dict  # the search's data_summary.json: counts per part and class, grouping, left-out images
    space_yaml: str
    config: dict[str, str]  # the champion's configuration (its trial run's parameters)
    experiment_id: str
    wording: CardWording | None = None  # the kind's words for its output (tune_cells.kinds); None: a classifier's
    selection: str = ""  # what the promotion chose, and why (the search run's `selection` tag)
    search_resumes: int = 0  # how often the search was resumed (`--resume`): its span includes the interruptions

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    def words(self, part: str) -> str:
        """One of the kind's card phrases with this model's labels filled in."""
        from tune_cells.kinds import CLASSIFICATION

        wording, classes = self.wording or CLASSIFICATION.card_wording, self.data.get("classes", [])
        return getattr(wording, part).format(n=len(classes), names=", ".join(classes) or wording.labels, task=self.task)


def metric_rows(metrics: dict[str, float]) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, 95% CI low, high) of an evaluation run's metrics: headline first, then the
    per-class (per-target) ones; each CI as logged beside it (`<metric>_ci_low`, `_ci_high`)."""
    keys = [k for k in metrics if not k.endswith(_INTERVAL_SUFFIXES)]
    ordered = [k for k in HEADLINE + CALIBRATION if k in keys] + sorted(k for k in keys if k not in HEADLINE + CALIBRATION)
    return [(k, metrics[k], metrics.get(f"{k}_ci_low"), metrics.get(f"{k}_ci_high")) for k in ordered]


def render_markdown(facts: CardFacts) -> str:
    sections = [_header(facts), _model(facts), _intended_use(facts), _data(facts), _search(facts), _configuration(facts),
                _metrics(facts), _calibration(facts), _reproduce(facts), _limits(facts), _references()]
    return "\n\n".join(section for section in sections if section) + "\n"


def _header(f: CardFacts) -> str:
    tags = f.version_tags
    status = tags.get("promotion_reason") or tags.get("promotion", "")
    return (f"# Model card: {f.model_name} version {f.version}\n\n"
            f"`{f.model_uri}`: {f.task}{f' ({f.task_description})' if f.task_description else ''}.\n"
            f"{status[:1].upper() + status[1:] + '. ' if status else ''}Evaluated {f.evaluation_time} in MLflow run "
            f"`{f.evaluation_run_id}`; this card is logged there ({'model_card.md'}, with `model_card.json`).")


def _model(f: CardFacts) -> str:
    tags, data, config = f.version_tags, f.data, f.config
    mean, std = data.get("train_channel_mean"), data.get("train_channel_std")
    size = (f"resized to {config['image_size']} px" if "image_size" in config else
            f"scaled by {config.get('scale', 1)} and cut into {config['tile_size']} px tiles overlapping by "
            f"{config.get('overlap', 0)}" if "tile_size" in config else "at its stored size")
    rows = [("Architecture", config.get("model", "?")),
            ("Input", f"{_channels(len(mean) if mean else None)} image, {size}"
                      + ("; normalised by ImageNet's channel mean and sd, as its pretrained filters expect"
                         if str(config.get("pretrained")).lower() == "true" else
                         f"; normalised by the training part's channel mean {_list(mean)} and sd {_list(std)}"
                         if mean else "")),
            ("Output", f.words("output") if data.get("classes") else "see the registered model's signature"),
            *[(name, tags[key]) for name, key in (("Test-time augmentation", "tta"), ("Temperature", "temperature"))
              if key in tags],
            ("Trained in", f"trial `{tags.get('ray_trial_id', '?')}` (run `{tags.get('trial_run_id', '?')}`), "
                           f"its best epoch {tags.get('epoch', '?')} of at most {f.search_params.get('max_epochs', '?')}"),
            *_averaged_weights(config, tags.get("epoch"), f.search_params.get("max_epochs")),
            *([("Ensemble", f"the mean of {len(tags['ensemble_seeds'].split(','))} networks of this configuration, "
                            f"trained under seeds {tags['ensemble_seeds']} (the first is the trial's)"
                            + _member_runs(tags))]
              if tags.get("ensemble_seeds") else []),
            *([("Ensemble", f"the mean of {len(tags['ensemble_trials'].split(','))} networks: the promoted trial "
                            f"and the search's next-best trials that trained every epoch: {tags['ensemble_trials']}"
                            + _member_runs(tags, "ensemble_trials", "trial"))]
              if tags.get("ensemble_trials") else []),
            *([("Ensemble", f"not built, so this is one network: {tags['ensemble_not_built']}")]
              if tags.get("ensemble_not_built") else []),
            ("Chosen by", f.search_params.get("promotion_policy", "the search's best trial")
             + (f" ({f.selection})" if is_rule_note(f.selection) else ""))]
    return "## Model\n\n" + _table(("", ""), rows)


def _member_runs(tags: dict[str, str], members_tag: str = "ensemble_seeds", noun: str = "seed") -> str:
    """"; their MLflow runs: seed S run `ID`, ..." from the version's `ensemble_member_run_ids` (in
    `members_tag`'s order; promotion writes '' for a member without a finished run). "" for a
    version promoted before the tag, or one whose two tags disagree in length (which run is whose?)."""
    members, runs = tags[members_tag].split(","), tags.get("ensemble_member_run_ids", "").split(",")
    if "ensemble_member_run_ids" not in tags or len(runs) != len(members):
        return ""
    named = [f"{noun} {member} run `{run}`" if run else f"{noun} {member} no finished run"
             for member, run in zip(members, runs)]
    return "; their MLflow runs: " + ", ".join(named)


def _averaged_weights(config: dict, epoch, max_epochs) -> list[tuple[str, str]]:
    """The "Weights" row of a champion whose trial averaged its weights (`swa_start`) by its best epoch."""
    try:
        first, last = first_averaged_epoch(float(config["swa_start"]), int(max_epochs)), int(epoch)
    except (KeyError, TypeError, ValueError):  # no averaging, or facts MLflow does not hold
        return []
    if last < first:
        return []
    epochs = f"epoch {last}" if first == last else f"epochs {first}-{last}"
    return [("Weights", f"the equal average of the weights after {epochs} (stochastic weight averaging, "
                        f"`swa_start` {config['swa_start']}), BatchNorm statistics recomputed on training views")]


def _intended_use(f: CardFacts) -> str:
    return (f"## Intended use\n\nResearch: {f.words('use')}. Not a medical device: not for diagnosis or treatment decisions. "
            "Check new data against the limits below before trusting its scores.")


def _data(f: CardFacts) -> str:
    data, tags, params = f.data, f.version_tags, f.search_params
    counts = data.get("counts") or {}
    parts = [p for p in ("train", "val", "test") if p in counts]
    lines = [f"## Data\n\nImages from `{data.get('root', tags.get('data_root', '?'))}`"
             f"{' (synthetic demo data)' if data.get('source') == 'demo' else ''}: {params.get('images', '?')} images. "
             f"Split file `{tags.get('split_file', params.get('split_file', '?'))}` (sha256 `{tags.get('split_sha256', '?')}`, "
             f"seed {tags.get('split_seed', params.get('seed', '?'))})."]
    if parts:
        names = list(next(iter(counts.values())))
        rows = [(name, *[counts[p].get(name, 0) for p in parts], sum(counts[p].get(name, 0) for p in parts))
                for name in names]
        if len(rows) > 1:
            rows.append(("all", *[sum(counts[p].values()) for p in parts], sum(sum(counts[p].values()) for p in parts)))
        lines.append(_table(("", *parts, "all"), rows))
    lines.append(_groups_sentence(data.get("grouping") or {}, len(data.get("excluded", [])),
                                  params.get("near_duplicates_across_splits")))
    return "\n\n".join(lines)


def _groups_sentence(grouping: dict, left_out: int, across) -> str:
    if not grouping:
        return "Groups of related images: not recorded (a split file from before groups)."
    key = grouping.get("group_key")
    checked = grouping.get("near_duplicates_checked", True)
    how = (f"by {key}" if key else "no patient, specimen or animal key in the data") + (
        f"; near-duplicates (within {grouping.get('near_duplicate_bits', '?')} bits of perceptual hash) merged "
        f"{grouping.get('merged_by_near_duplicates', 0)} groups" if checked else "; near-duplicates not checked")
    said = [f"{grouping.get('groups', 0)} groups of related images, each kept in one part ({how})"
            if grouping.get("groups") else f"no related images found ({how})"]
    if left_out:
        said.append(f"{left_out} images left out of every part (near-duplicates of images the layout fixes in another part)")
    if across not in (None, "", "0"):
        said.append(f"{across} near-identical image pairs still sit in two parts (see `near_duplicates.csv` of the search)")
    return "Groups: " + "; ".join(said) + "."


def _search(f: CardFacts) -> str:
    p, m = f.search_params, f.search_metrics
    seconds = f"{f.search_seconds:.0f} s" if f.search_seconds is not None else "unknown"
    trials = int(m.get("trials", 0))
    budget = (f", a time budget of {p['time_budget']} min ({int(m.get('trials_stopped_by_time_budget', 0))} trials "
              "stopped by it)" if p.get("time_budget") not in (None, "None") else "")
    lines = [f"## Search\n\nSearch `{f.search_name}` (run `{f.search_run_id}`): space `{p.get('space', '?')}`; budget "
             f"{p.get('samples', '?')} trials of at most {p.get('max_epochs', '?')} epochs, ASHA grace period "
             f"{p.get('grace_period', '?')} and reduction factor {p.get('reduction_factor', '?')}, "
             f"{p.get('folds', '1')} fold(s), seed {p.get('seed', '?')}{budget}. {trials} trials ran "
             f"({int(m.get('trials_stopped_early', 0))} stopped early by ASHA, {int(m.get('trials_failed', 0))} failed) "
             f"in {seconds} (the search run, from its first trial to the promotion"
             + (f"; resumed {f.search_resumes} time(s), so this includes the time it stood interrupted"
                if f.search_resumes else "") + "). "
             f"Best {p.get('metric', 'validation score')}: {_number(m.get('best_' + p.get('metric', '')))}; as the model "
             f"predicts (with what promotion set: thresholds, test-time augmentation, temperature) "
             f"on validation: "
             f"{_number(_float(f.version_tags.get('validation_score')))}."]
    if f.space_yaml:
        lines.append("The space:\n\n```yaml\n" + f.space_yaml.strip() + "\n```")
    return "\n\n".join(lines)


def _configuration(f: CardFacts) -> str:
    if not f.config:
        return ""
    return "## Configuration of the champion\n\n" + _table(("parameter", "value"), sorted(f.config.items()))


def _metrics(f: CardFacts) -> str:
    e = f.evaluation_params
    unit = e.get("bootstrap_unit", "image")
    rows = []
    for key, value, low, high in metric_rows(f.metrics):
        if key in CALIBRATION:
            continue
        shown = f"{value:.0f}" if "pixels" in key and math.isfinite(value) else _number(value)  # a count
        rows.append((key, shown, f"[{_number(low)}, {_number(high)}]" if low is not None else ""))
        if key == "test_accuracy" and "test_accuracy_exact_ci_low" in f.metrics:
            rows.append(("test_accuracy (exact binomial CI)", "", f"[{_number(f.metrics['test_accuracy_exact_ci_low'])}, "
                                                                   f"{_number(f.metrics['test_accuracy_exact_ci_high'])}]"))
    units = f"{e.get('bootstrap_units', '?')} {unit}s"
    intervals = (f"95% intervals from {e.get('bootstrap_resamples', '?')} bootstrap resamples of the {units}"
                 f"{' (whole groups: related images together)' if unit == 'group' else ''}"
                 if any(row[2] for row in rows) else f"no 95% intervals: {units} are too few to resample")
    return (f"## Test metrics\n\nOn the {e.get('test_images', '?')} images of the test part, never used to train or "
            f"choose the model; {intervals}. The numbers are the evaluation run's logged metrics.\n\n"
            + _table(("metric", "value", "95% CI"), rows))


def _calibration(f: CardFacts) -> str:
    if "test_ece" not in f.metrics:
        return ("## Calibration\n\nNot measured: the outputs are masks (each target cut at the threshold promotion "
                "kept: the version's threshold_<target> tags), not class probabilities.")
    tags = f.version_tags
    return (f"## Calibration\n\nExpected calibration error on the test part: "
            f"{_number(f.metrics.get('test_ece_before_temperature'))} before temperature scaling, "
            f"{_number(f.metrics['test_ece'])} after (temperature {tags.get('temperature', '1')}, fitted on the validation "
            f"part, where it moved the ECE from {tags.get('val_ece_before', '?')} to {tags.get('val_ece_after', '?')}). "
            "Lower is better; the temperature never changes which class wins.")


def _reproduce(f: CardFacts) -> str:
    p, tags = f.search_params, f.version_tags
    flags = [f"--data {tags.get('data_root', p.get('data'))}" if f.data.get("source") != "demo" else None,
             f"--space {p['space']}" if p.get("space") else None,
             *(f"--{name.replace('_', '-')} {p[name]}" for name in ("samples", "max_epochs", "grace_period",
                                                                    "reduction_factor", "time_budget", "folds", "seed")
               if p.get(name) not in (None, "None")),
             f"--group-pattern '{p['group_pattern']}'" if p.get("group_pattern") not in (None, "None") else None,
             f"--workdir {p['workdir']}" if p.get("workdir") else None]
    workdir = f" --workdir {p['workdir']}" if p.get("workdir") else ""
    search = " ".join(["tune-cells search", f.task, *(flag for flag in flags if flag)])
    return ("## Reproduce\n\nThe search reuses the split file above when it is in the working folder's `splits/` "
            "(it is also logged with the search run); trials run in parallel are not bit-for-bit repeatable.\n\n"
            f"```\n{search}\ntune-cells evaluate {f.task} --model-uri {f.model_uri}{workdir}\n"
            f"tune-cells card {f.task} --version {f.version}{workdir}\n```\n\n"
            f"The champion's configuration alone (every parameter pinned): `--space` with `{f.search_run_id}.yaml` "
            "from the search run's artifacts (also in the working folder's `best-configs/`).")


def _limits(f: CardFacts) -> str:
    data, e, grouping = f.data, f.evaluation_params, f.data.get("grouping") or {}
    test = e.get("test_images", "?")
    task_metric = "test_" + f.search_params.get("metric", "").removeprefix("val_")
    intervals = {key: (low, high) for key, _, low, high in metric_rows(f.metrics) if low is not None}
    key = next((k for k in (task_metric, *HEADLINE) if k in intervals), None)
    width = intervals[key][1] - intervals[key][0] if key else 0.0
    said = [f"The test part holds {test} images"
            + (f" in {e.get('bootstrap_units')} groups" if e.get("bootstrap_unit") == "group" else "")
            + (f"; the 95% interval of {key} is {width:.2f} wide, so differences between models smaller "
               "than that are not shown by this test" if key else "") + "."]
    if not grouping.get("group_key"):
        said.append("The data records no patient, specimen or slide IDs: images of one patient or slide may sit in "
                    "both the training and the test part (only near-duplicate images were kept together), so the "
                    "test scores may be optimistic for new patients.")
    said.append(f"All images come from one collection (`{data.get('root', f.version_tags.get('data_root', '?'))}`): "
                "the model never saw another stain, scanner, magnification, laboratory or population. Expect lower "
                f"scores there; measure them with `tune-cells evaluate {f.task} --data OTHER_SET`.")
    if data.get("source") == "demo":
        said.append("These are synthetic demo images: the numbers say nothing about real data.")
    if data.get("classes"):
        said.append(f.words("limit"))
    return "## Limits\n\n" + "\n".join(f"- {line}" for line in said)


def _references() -> str:
    return "## References\n\n" + "\n".join(f"- {ref}" for ref in REFERENCES)


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in cells)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a" if value is None else str(value)


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _list(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]" if values else "?"


def _channels(n: int | None) -> str:
    return {1: "greyscale", 3: "RGB"}.get(n, f"{n}-channel" if n else "an")
