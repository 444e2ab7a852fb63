"""Static shape of the package, read from the source by AST (nothing is imported, so this stays fast).

* no import cycles among the package's own modules: imports inside functions, relative imports and
  module names passed as strings (``importlib.import_module("tune_cells.x")``, lazy registries) count;
  a package importing its own submodules is not a cycle;
* the task kind is never compared as a string ("classification"/"segmentation") outside
  tune_cells/kinds/, which holds the kind objects;
* modules stay small: tune_cells/search.py at most 250 lines, any module at most 400.

Each failure lists one finding a line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Mirrors [tool.setuptools.package-dir] in pyproject.toml (checked against it below when tomllib exists).
PACKAGE_DIRS = {
    "tune_cells": "tune_cells",
    "tune_cells.search_spaces": "search_spaces",
    "tune_cells.trainables": "trainables",
    "tune_cells.analysis": "analysis",
}
KIND_STRINGS = {"classification", "segmentation"}
KINDS_FOLDER = "tune_cells/kinds"
MAX_SEARCH_LINES = 250
MAX_MODULE_LINES = 400


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # imported project module -> first line

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _package_dirs() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return PACKAGE_DIRS
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def _modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    dirs = _package_dirs()
    for package, folder in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            # a folder mapped to its own package elsewhere is walked under that name, not twice
            if any((Path(folder, *parts[:i]).as_posix() in dirs.values()) for i in range(1, len(parts))):
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            modules[name] = Module(name, path, is_package, tree)
    for module in modules.values():
        _collect_imports(module, modules)
    return modules


def _resolve(name: str, modules: dict[str, Module]) -> str | None:
    """The project module `name` lives in (`tune_cells.models.build` -> `tune_cells.models`), if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _collect_imports(module: Module, modules: dict[str, Module]) -> None:
    def add(target: str | None, line: int) -> None:
        if target and target != module.name:
            module.imports.setdefault(target, line)

    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name if module.is_package else module.name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                add(_resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules), node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            # a module named in a string is imported dynamically (importlib, lazy registries)
            if "." in node.value:
                add(node.value, node.lineno)


def _import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph = {}
    for name, module in modules.items():
        # a package importing its own submodules (re-exports) is how packages work, not a cycle
        graph[name] = {t for t in module.imports if not (module.is_package and t.startswith(name + "."))}
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _fail(findings: list[str], summary: str) -> None:
    if findings:
        pytest.fail(f"{summary} ({len(findings)}):\n" + "\n".join(findings), pytrace=False)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return _modules()


def test_walk_finds_the_package(modules):
    assert set(_package_dirs()) <= set(modules)
    assert "tune_cells.search" in modules and "tune_cells.data.images" in modules
    assert PACKAGE_DIRS == _package_dirs(), "PACKAGE_DIRS no longer matches pyproject's package-dir"


def test_no_import_cycles(modules):
    graph = _import_graph(modules)
    findings = []
    for component in _strongly_connected(graph):
        members = set(component)
        edges = [
            f"{modules[a].rel}:{modules[a].imports[b]} imports {b}"
            for a in component
            for b in sorted(graph[a] & members)
        ]
        findings.append(f"cycle: {' <-> '.join(component)}  [{'; '.join(edges)}]")
    _fail(findings, "import cycles among the package's modules")


def _kind_literals(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and node.value in KIND_STRINGS:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in KIND_STRINGS]
    return []


def test_kind_is_not_compared_as_a_string(modules):
    findings = []
    for module in modules.values():
        if module.rel.startswith(KINDS_FOLDER + "/"):
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):  # `case "segmentation":`
                operands = [node.value]
            else:
                continue
            if any(_kind_literals(operand) for operand in operands):
                findings.append(f"{module.rel}:{node.lineno} compares the kind as a string")
    _fail(sorted(findings, key=_by_path_and_line), f"kind compared as a string outside {KINDS_FOLDER}/")


def _by_path_and_line(finding: str) -> tuple[str, int]:
    path, _, rest = finding.partition(":")
    return path, int(rest.split()[0])


def test_modules_are_small(modules):
    findings = []
    for module in sorted(modules.values(), key=lambda m: m.rel):
        lines = len(module.path.read_text(encoding="utf-8").splitlines())
        limit = MAX_SEARCH_LINES if module.name == "tune_cells.search" else MAX_MODULE_LINES
        if lines > limit:
            findings.append(f"{module.rel}: {lines} lines, limit {limit}")
    _fail(findings, "modules over their size limit")
