"""Search spaces as YAML files, sampled define-by-run by Optuna.

A space file has `params` (sampled in order), optional `initial_points` (configurations tried
first, e.g. a published recipe) and nothing else. A parameter is one of:

    lr: {float: [1.0e-4, 1.0e-2], log: true}
    depth: {int: [2, 4]}
    model: {choices: [small_convnet, resnet18]}
    image_size: 64                        # fixed value
    width: {choices: [16, 32], when: {model: small_convnet}}   # conditional

`when` maps earlier parameters to a value or a list of values; the parameter is sampled only
when all of them match. A parameter may instead take one range per case, a list of alternatives
each with its own `when` (exactly one must apply in each case; see `alternatives`):

    lr:
      - {float: [2.0e-4, 3.0e-3], log: true, when: {optimizer: adamw}}
      - {float: [5.0e-3, 1.0e-1], log: true, when: {optimizer: sgd}}

Optuna samples these as `lr(adamw)` and `lr(sgd)`; the trial's configuration, initial points and
MLflow's params say `lr`. A file whose params are all fixed is a pinned configuration.
"""

from __future__ import annotations

import math
import reprlib  # values quoted in errors stay short (a YAML alias can expand to gigabytes)
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tune_cells.errors import UserInputError
from tune_cells.search_spaces.alternatives import check_alternatives, covering, optuna_names, possible, resolve

_KINDS = ("float", "int", "choices")
_KEYS = {"float", "int", "choices", "log", "step", "when"}


@dataclass
class SearchSpace:
    """A picklable define-by-run function: `space(optuna_trial)` samples the trial and returns the
    values its params lack (the fixed ones; per-case parameters under their plain names)."""

    params: dict[str, Any]
    source: str
    initial_points: list[dict] = field(default_factory=list)
    fallback: str | None = None  # the from-scratch space searched where no ImageNet weights can be had

    def __call__(self, trial) -> dict[str, Any]:
        """Sample `trial`; return what its params lack: the fixed values, and each per-case
        parameter's value under its plain name (Optuna knows it as `lr(sgd)`)."""
        fixed, renamed = self._walk(trial)
        return {**fixed, **renamed}

    def _walk(self, trial) -> tuple[dict[str, Any], dict[str, Any]]:
        fixed: dict[str, Any] = {}
        renamed: dict[str, Any] = {}
        chosen: dict[str, Any] = {}
        for name, spec in self.params.items():
            if not isinstance(spec, (dict, list)):
                fixed[name] = chosen[name] = spec
                continue
            picked = resolve(name, spec, chosen)
            if picked is None:
                continue
            optuna_name, spec = picked
            chosen[name] = _suggest(trial, optuna_name, spec)
            if optuna_name != name:
                renamed[name] = chosen[name]
        return fixed, renamed

    def sample(self, trial) -> dict[str, Any]:
        """The full configuration of one trial (sampled and fixed values together, plain names)."""
        returned = self(trial)
        return {**self.plain(trial.params), **returned}

    @property
    def fixed(self) -> dict[str, Any]:
        """The parameters that are not searched."""
        return {name: spec for name, spec in self.params.items() if not isinstance(spec, (dict, list))}

    @property
    def alternative_names(self) -> dict[str, str]:
        """Optuna's name of each per-case alternative (`lr(sgd)`) -> the parameter's name (`lr`)."""
        return {optuna_name: name for name, spec in self.params.items() if isinstance(spec, list)
                for optuna_name in optuna_names(name, spec)}

    def plain(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` without the Optuna-only names of per-case alternatives (Ray's OptunaSearch adds
        every suggested name to a trial's configuration; the plain name comes from `__call__`)."""
        optuna_only = self.alternative_names
        return {name: value for name, value in config.items() if name not in optuna_only}

    def optuna_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """An initial point (plain names) as Optuna enqueues it: a per-case parameter's value under
        the name of each alternative the point leaves possible; one, when it also sets what their
        `when`s name. Optuna ignores the names a trial does not suggest."""
        known = {**self.fixed, **point}
        enqueued = {name: value for name, value in point.items() if not isinstance(self.params.get(name), list)}
        for name, spec in self.params.items():
            if isinstance(spec, list) and name in point:
                enqueued.update({optuna_name: point[name] for optuna_name, alternative in
                                 zip(optuna_names(name, spec), spec) if possible(alternative["when"], known)})
        return enqueued

    def merged(self) -> SearchSpace:
        """This space with each per-case parameter as one range over its alternatives (see
        `alternatives.covering`; left out where they cannot merge): one Optuna name per parameter."""
        params = {name: covering(spec) if isinstance(spec, list) else spec for name, spec in self.params.items()}
        return replace(self, params={name: spec for name, spec in params.items() if spec is not None})

    def applies(self, name: str, chosen: dict[str, Any]) -> bool:
        """Whether parameter `name` has a value given the earlier ones in `chosen`."""
        spec = self.params[name]
        return not isinstance(spec, (dict, list)) or resolve(name, spec, chosen) is not None

    def declared_numbers(self, name: str) -> list[float]:
        """Every number the space declares for `name`: fixed values, choices, both ends of a range,
        in every alternative and initial point (its bounds, whatever a sampler draws)."""
        spec = self.params.get(name, [])
        values = [point[name] for point in self.initial_points if name in point]
        for one in spec if isinstance(spec, list) else [spec]:
            values += [*one.get("choices", []), *one.get("int", one.get("float", []))] if isinstance(one, dict) else [one]
        return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def largest(self, name: str) -> float | None:
        """The largest number `name` can take; None where the space never sets it to a number."""
        return max(self.declared_numbers(name), default=None)

    @property
    def may_use_pretrained(self) -> bool:
        """Whether some configuration of this space asks for ImageNet weights."""
        spec = self.params.get("pretrained", False)
        values = [v for s in (spec if isinstance(spec, list) else [spec])
                  for v in (s.get("choices", [True]) if isinstance(s, dict) else [s])]
        return any(bool(v) for v in values) or any(p.get("pretrained") for p in self.initial_points)

    def to_yaml(self) -> str:
        # In file order: a `when` names earlier parameters, so sorted names would break a replay (the report's).
        return yaml.safe_dump({"params": self.params, "initial_points": self.initial_points}, sort_keys=False)

    @property
    def name(self) -> str:
        """What searches of "the same space" share: the space file's name without .yaml."""
        return Path(self.source).stem

    def as_optuna(self, config: dict[str, Any], strict: bool = True) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """A trial's configuration (its values, or their text as MLflow logs them) as Optuna params and
        distributions of this space, exactly as sampling it would have made them; None when it is no
        point of this space: a sampled value missing or outside its range or choices, or a fixed value
        that differs. Parameters the space does not have are left out. Not `strict`: a number outside
        its range is kept (an initial point may lie outside, as Optuna allows for enqueued trials)."""
        replay = _Replay(config, strict, self.alternative_names)
        try:
            fixed, _ = self._walk(replay)
        except _NotInSpace:
            return None
        if strict and any(name not in config or str(config[name]) != str(value) for name, value in fixed.items()):
            return None
        return replay.params, replay.distributions


def _suggest(trial, name: str, spec: dict) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    if "int" in spec:
        low, high = spec["int"]
        return trial.suggest_int(name, low, high, step=spec.get("step") or 1, log=spec.get("log", False))
    low, high = spec["float"]
    return trial.suggest_float(name, low, high, step=spec.get("step"), log=spec.get("log", False))


class _NotInSpace(Exception):
    pass


class _Replay:
    """Stands in for an Optuna trial: answers each suggestion with the configuration's own value,
    checked against the suggestion's range or choices, and keeps the distribution. A per-case
    alternative's value is read from the parameter's plain name (`keys`: Optuna name -> plain)."""

    def __init__(self, config: dict[str, Any], strict: bool = True, keys: dict[str, str] | None = None):
        self.config, self.strict, self.keys = config, strict, keys or {}
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}

    def suggest_categorical(self, name, choices):
        from optuna.distributions import CategoricalDistribution

        raw = self._raw(name)
        value = next((c for c in choices if str(c) == str(raw)), _NotInSpace)
        if value is _NotInSpace:
            raise _NotInSpace
        return self._keep(name, value, CategoricalDistribution(choices), True)

    def suggest_int(self, name, low, high, step=1, log=False):
        from optuna.distributions import IntDistribution

        value = self._number(name, int)
        return self._keep(name, value, IntDistribution(low, high, log=log, step=step),
                          low <= value <= high and (value - low) % step == 0)

    def suggest_float(self, name, low, high, step=None, log=False):
        from optuna.distributions import FloatDistribution

        value = self._number(name, float)
        on_step = step is None or abs(round((value - low) / step) * step - (value - low)) <= 1e-8 * max(1.0, abs(step))
        return self._keep(name, value, FloatDistribution(low, high, log=log, step=step), low <= value <= high and on_step)

    def _raw(self, name):
        key = self.keys.get(name, name)
        if key not in self.config:
            raise _NotInSpace
        return self.config[key]

    def _number(self, name, kind):
        try:  # through its text: a boolean is no number, and MLflow's params are text anyway
            return kind(str(self._raw(name)))
        except ValueError:
            raise _NotInSpace from None

    def _keep(self, name, value, distribution, inside: bool):
        if not inside and self.strict:
            raise _NotInSpace
        self.params[name], self.distributions[name] = value, distribution
        return value


def point_matches(point: dict, config: dict) -> bool:
    """Whether a trial's configuration is this initial point (the point may fix only some
    parameters). `config` as Ray hands it (numbers) or as MLflow logs it (text)."""
    def same(a: Any, b: Any) -> bool:
        if _is_number(a) and _is_number(b):
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        return a == b or str(a) == str(b)

    return bool(point) and all(k in config and same(v, config[k]) for k, v in point.items())


def builtin_space_path(name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))


def load_space(path: Path | str) -> SearchSpace:
    """Read and check a space file; every problem is a UserInputError naming the file. A bare
    name (`nuclei-pretrained`) that is not a file names one of the spaces shipped here."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1 and builtin_space_path(path.name).exists():
        path = builtin_space_path(path.name)
    if path.is_dir():
        raise UserInputError(f"--space {path}: a folder; give a space file (.yaml) in it")
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"--space {path}: no such file") from None
    except UnicodeDecodeError:
        raise UserInputError(f"--space {path}: not a text file") from None
    except OSError as exc:
        raise UserInputError(f"--space {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserInputError(f"{path}: YAML syntax error{where}") from None
    if not isinstance(document, dict) or not isinstance(document.get("params"), dict) or not document["params"]:
        raise UserInputError(f"{path}: expected a mapping with a non-empty `params:` section")
    unknown = set(document) - {"params", "initial_points", "description", "fallback"}
    if unknown:
        raise UserInputError(f"{path}: unknown section {sorted(unknown)[0]!r}")
    params = document["params"]
    seen: list[str] = []
    for name, spec in params.items():
        _check_param(path, name, spec, seen)
        seen.append(name)
    check_alternatives(path, params)
    points = document.get("initial_points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UserInputError(f"{path}: initial_points must be a list of mappings")
    for point in points:
        extra = set(point) - set(params)
        if extra:
            raise UserInputError(f"{path}: initial point sets unknown parameter {sorted(extra)[0]!r}")
        for name, value in point.items():
            _check_finite(f"{path}: initial point, parameter {name!r}", value)
    fallback = document.get("fallback")
    if fallback is not None and not (isinstance(fallback, str) and builtin_space_path(fallback).exists()):
        raise UserInputError(f"{path}: fallback {fallback!r} is not a space shipped with tune-cells")
    return SearchSpace(params=params, source=str(path), initial_points=points, fallback=fallback)


def _check_param(path: Path, name: str, spec: Any, earlier: list[str]) -> None:
    where = f"{path}: parameter {name!r}"
    if not isinstance(name, str) or "/" in name:
        raise UserInputError(f"{where}: names are plain strings without '/'")
    if isinstance(spec, list):
        _check_alternatives(where, spec, earlier)
    elif isinstance(spec, dict):
        _check_spec(where, spec, earlier)
    elif not isinstance(spec, (int, float, str, bool)):
        raise UserInputError(f"{where}: a fixed value must be a number, string or boolean")
    else:
        _check_finite(where, spec)


def _check_alternatives(where: str, specs: list, earlier: list[str]) -> None:
    """A per-case parameter: a list of ranges or choices, each with the `when` that selects it."""
    if not specs:
        raise UserInputError(f"{where}: a list gives one range or choices per case; it is empty")
    for i, spec in enumerate(specs, 1):
        if not isinstance(spec, dict):
            raise UserInputError(f"{where}: alternative {i} must be a range or choices with `when`, not {reprlib.repr(spec)}")
        if not spec.get("when"):
            raise UserInputError(f"{where}: alternative {i} has no `when` (each alternative says which case it is "
                                 "for)")
        _check_spec(f"{where}, alternative {i}", spec, earlier)


def _check_spec(where: str, spec: dict, earlier: list[str]) -> None:
    bad = set(spec) - _KEYS
    if bad:
        raise UserInputError(f"{where}: unknown key {sorted(bad)[0]!r} (use one of float, int, choices)")
    kinds = [k for k in _KINDS if k in spec]
    if len(kinds) != 1:
        raise UserInputError(f"{where}: give exactly one of float, int, choices")
    kind = kinds[0]
    if kind == "choices":
        _check_choices(where, spec)
    else:
        bounds = spec[kind]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
            raise UserInputError(f"{where}: {kind} needs [low, high]")
        if kind == "int" and not all(isinstance(b, int) for b in bounds):
            raise UserInputError(f"{where}: int bounds must be integers")
        low, high = bounds
        if low > high:
            raise UserInputError(f"{where}: low {low} is above high {high}")
        _check_scale(where, kind, spec, low)
    _check_when(where, spec.get("when"), earlier)


def _check_when(where: str, when: Any, earlier: list[str]) -> None:
    if when is None:
        return
    if not isinstance(when, dict):
        raise UserInputError(f"{where}: `when` maps earlier parameters to a value or a list of values")
    for dep, wanted in when.items():
        if dep not in earlier:
            raise UserInputError(f"{where}: `when` refers to {dep!r}, which is not an earlier parameter")
        if not all(isinstance(v, _CHOICE_TYPES) for v in (wanted if isinstance(wanted, list) else [wanted])):
            raise UserInputError(f"{where}: `when` gives {dep!r} {reprlib.repr(wanted)}; give a value or a list of values")


# What Optuna stores as a categorical choice; anything else (a mapping, a list) fails every trial.
_CHOICE_TYPES = (type(None), bool, int, float, str)


def _is_number(value: Any) -> bool:
    """A finite number (YAML's .nan and .inf are floats, and no range or step)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_finite(where: str, value: Any) -> None:
    """A value a trial gets as it is: YAML's .nan or .inf would train (lr: .inf) or log nonsense."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{where}: {value} is not a finite number")


def _check_choices(where: str, spec: dict) -> None:
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise UserInputError(f"{where}: choices must be a non-empty list")
    for choice in choices:
        if not isinstance(choice, _CHOICE_TYPES):
            raise UserInputError(f"{where}: choice {reprlib.repr(choice)} is a {type(choice).__name__}; choices must be "
                                 "numbers, strings, booleans or null")
        _check_finite(where, choice)
    for key in ("log", "step"):
        if key in spec:
            raise UserInputError(f"{where}: `{key}` applies to float and int ranges, not to choices")


def _check_scale(where: str, kind: str, spec: dict, low: float) -> None:
    """`log` and `step` as Optuna takes them: a boolean log, a positive step, never both."""
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise UserInputError(f"{where}: log must be true or false, not {reprlib.repr(log)}")
    if log and low <= 0:
        raise UserInputError(f"{where}: a log scale needs low > 0")
    if step is None:
        return
    if log:
        raise UserInputError(f"{where}: give log or step, not both (Optuna samples a log scale without steps)")
    if not _is_number(step) or step <= 0:
        raise UserInputError(f"{where}: step must be a number above 0, not {reprlib.repr(step)}")
    if kind == "int" and not isinstance(step, int):
        raise UserInputError(f"{where}: an int step must be a whole number, not {step!r}")
