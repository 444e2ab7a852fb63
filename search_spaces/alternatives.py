"""Conditions (`when`) and per-case parameters: a list of alternatives, one per case.

    lr:
      - {float: [2.0e-4, 3.0e-3], log: true, when: {optimizer: adamw}}
      - {float: [5.0e-3, 1.0e-1], log: true, when: {optimizer: sgd}}

Optuna sees each alternative under its own name, the parameter's name followed by the values of
its `when` (`lr(adamw)`, `lr(sgd)`; `lr(optimizer=sgd)` where the values alone would repeat), so
that TPE models each range apart and one Optuna name never has two distributions; the trial's
configuration has the plain name (`lr`) only. Loading checks that exactly one alternative applies
in every case the space can produce, except where a parameter the `when`s name is itself left out
by its own `when`: then none needs to, and the parameter is left out too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tune_cells.errors import UserInputError

_MAX_CASES = 10_000  # cases the coverage check walks before refusing (a `when` over many parameters)


class _Other:
    """A range's value that no `when` names (all such values behave alike in every condition)."""

    def __repr__(self) -> str:
        return "another value"


OTHER = _Other()


def applies(when: dict | None, chosen: dict) -> bool:
    """Whether every parameter `when` names has been chosen with one of its listed values."""
    if not when:
        return True
    for name, wanted in when.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if name not in chosen or chosen[name] not in allowed:
            return False
    return True


def optuna_names(name: str, specs: list[dict]) -> list[str]:
    """Each alternative's Optuna name: `lr(sgd)`, or `lr(optimizer=sgd)` where values alone repeat."""
    short = [f"{name}({','.join(_text(v) for v in spec['when'].values())})" for spec in specs]
    if len(set(short)) == len(short):
        return short
    return [f"{name}({','.join(f'{k}={_text(v)}' for k, v in spec['when'].items())})" for spec in specs]


def _text(value: Any) -> str:
    return "|".join(map(str, value)) if isinstance(value, list) else str(value)


def resolve(name: str, spec: dict | list, chosen: dict) -> tuple[str, dict] | None:
    """The range or choices `name` is sampled from, given the values chosen so far, with its Optuna
    name; None when it does not apply. Loading made sure at most one alternative applies."""
    if isinstance(spec, dict):
        return (name, spec) if applies(spec.get("when"), chosen) else None
    return next(((n, s) for n, s in zip(optuna_names(name, spec), spec) if applies(s["when"], chosen)), None)


def possible(when: dict, known: dict) -> bool:
    """Whether `when` can still hold given only some values (an initial point leaves the rest open)."""
    return all(name not in known or known[name] in (w if isinstance(w, list) else [w]) for name, w in when.items())


def check_alternatives(path: Path, params: dict) -> None:
    """Load-time checks of the per-case parameters (each alternative's own syntax is checked with
    the other parameters): distinct Optuna names, and exactly one alternative per case."""
    listed = [name for name, spec in params.items() if isinstance(spec, list)]
    for name in listed:
        _check_names(path, name, params[name], set(params))
    if listed:
        _Coverage(path, params, _relevant(params, listed)).walk()


def _check_names(path: Path, name: str, specs: list[dict], taken: set[str]) -> None:
    names = optuna_names(name, specs)
    for i, optuna_name in enumerate(names):
        if "/" in optuna_name:  # Ray reads '/' as nesting
            raise UserInputError(f"{path}: parameter {name!r}: alternative {i + 1}'s `when` values may not "
                                 "contain '/'")
        if optuna_name in taken:
            raise UserInputError(f"{path}: parameter {name!r}: alternative {i + 1} would be sampled as "
                                 f"{optuna_name!r}, which is another parameter's name")
        if optuna_name in names[:i]:
            raise UserInputError(f"{path}: parameter {name!r}: alternatives {names.index(optuna_name) + 1} and "
                                 f"{i + 1} have the same `when`")


def _relevant(params: dict, listed: list[str]) -> set[str]:
    """The parameters whose values decide which alternative applies: those the alternatives' `when`s
    name, and (since a parameter may itself be conditional) those their own `when`s name."""
    todo = [dep for name in listed for spec in params[name] for dep in spec["when"]]
    seen: set[str] = set()
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo += [d for spec in _specs(params[dep]) for d in (spec.get("when") or {})]
    return seen


def _specs(spec: Any) -> list[dict]:
    return spec if isinstance(spec, list) else [spec] if isinstance(spec, dict) else []


class _Coverage:
    """Walks every case of the relevant parameters (a range counts as the values `when`s name, plus
    one for all others), checking each per-case parameter where it comes in the order."""

    def __init__(self, path: Path, params: dict, relevant: set[str]):
        self.path, self.params, self.relevant, self.cases = path, params, relevant, 0
        self.order = [name for name, spec in params.items() if name in relevant or isinstance(spec, list)]
        self.named: dict[str, list] = {}
        for spec in (s for value in params.values() for s in _specs(value)):
            for dep, wanted in (spec.get("when") or {}).items():
                self.named.setdefault(dep, []).extend(wanted if isinstance(wanted, list) else [wanted])

    def walk(self) -> None:
        stack: list[tuple[dict, int]] = [({}, 0)]  # (values chosen so far, next parameter): depth-first
        while stack:
            chosen, i = stack.pop()
            if i == len(self.order):
                self.cases += 1
                if self.cases > _MAX_CASES:
                    listed = [repr(n) for n in self.order if isinstance(self.params[n], list)]
                    raise UserInputError(f"{self.path}: parameter{'s' if len(listed) > 1 else ''} {', '.join(listed)}: "
                                         f"the alternatives' `when`s span over {_MAX_CASES} cases; name fewer "
                                         "parameters in them")
                continue
            name, spec = self.order[i], self.params[self.order[i]]
            if isinstance(spec, list):
                picked = self._one(name, spec, chosen)
            elif isinstance(spec, dict):
                picked = spec if applies(spec.get("when"), chosen) else None
            else:
                picked = spec  # a fixed value (never None: loading refuses null)
            if picked is None:
                stack.append((chosen, i + 1))
            else:
                stack.extend(({**chosen, name: value}, i + 1) for value in reversed(self._values(name, picked)))

    def _one(self, name: str, specs: list[dict], chosen: dict) -> dict | None:
        matching = [i for i, spec in enumerate(specs) if applies(spec["when"], chosen)]
        deps = list(dict.fromkeys(dep for spec in specs for dep in spec["when"]))
        case = ", ".join(f"{dep}={chosen[dep]!r}" for dep in deps if dep in chosen) or "they are left out"
        if len(matching) > 1:
            raise UserInputError(f"{self.path}: parameter {name!r}: alternatives {matching[0] + 1} and "
                                 f"{matching[1] + 1} both apply when {case}")
        if not matching and all(dep in chosen for dep in deps):
            raise UserInputError(f"{self.path}: parameter {name!r}: no alternative applies when {case} (give one "
                                 "for every case)")
        return specs[matching[0]] if matching else None

    def _values(self, name: str, spec: Any) -> list:
        """The values of `name` that can make a difference to a `when`."""
        if not isinstance(spec, dict):
            return [spec]
        if name not in self.relevant:  # a per-case parameter no `when` names: only its presence counts
            return [OTHER]
        if "choices" in spec:
            return list(spec["choices"])
        kind = "int" if "int" in spec else "float"
        low, high = spec[kind]
        step = spec.get("step") or (1 if kind == "int" else None)
        named = list(dict.fromkeys(v for v in self.named.get(name, []) if _on(v, low, high, step)))
        whole = step is not None and len(named) == int((high - low) // step) + 1  # every value is named
        return named if whole or (low == high and named) else [*named, OTHER]


def _on(value: Any, low: float, high: float, step: float | None) -> bool:
    """Whether a range [low, high] (on `step`) holds `value`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        return False
    return step is None or abs(round((value - low) / step) * step - (value - low)) <= 1e-8 * max(1.0, abs(step))


def covering(specs: list[dict]) -> dict | None:
    """One range (or choices) over all of a per-case parameter's alternatives, for what needs one
    distribution per parameter (fANOVA importance); None when they mix kinds or scales. Its `when`
    is theirs where they all name the same one parameter, else none."""
    kinds = {next(k for k in ("float", "int", "choices") if k in spec) for spec in specs}
    if len(kinds) != 1 or len({(spec.get("log", False), spec.get("step")) for spec in specs}) != 1:
        return None
    kind = kinds.pop()
    if kind == "choices":
        merged: dict = {"choices": list(dict.fromkeys(c for spec in specs for c in spec["choices"]))}
    else:
        merged = {kind: [min(s[kind][0] for s in specs), max(s[kind][1] for s in specs)],
                  **{k: specs[0][k] for k in ("log", "step") if k in specs[0]}}
    keys = {tuple(spec["when"]) for spec in specs}
    if len(keys) == 1 and len(next(iter(keys))) == 1:
        (dep,) = next(iter(keys))
        merged["when"] = {dep: [v for spec in specs for v in _listed(spec["when"][dep])]}
    return merged


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]
