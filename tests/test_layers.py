"""The layer contract (issue 25): what depends on what can be read from the tree.

``lint-imports`` (in .ci/run) checks the contracts of ``[tool.importlinter]`` in pyproject.toml.
These tests check what they cannot say: that no import cycle joins two packages anywhere, counting
``moa_serve_app`` (a module, which import-linter cannot read) and the install names beside ``moa``;
and that every package has its place in a contract, so a new one cannot slip in unplaced. Imports
inside functions and under ``TYPE_CHECKING`` count: an import deferred to dodge a cycle is still one.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parent.parent
# The install names: three packages grimp reads, and the module it cannot (read here with ast).
PACKAGES = ("moa", "moa_actors", "moa_observability")
APP, APP_FILE = "moa_serve_app", ROOT / "serve_app.py"
OURS = (*PACKAGES, APP)


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _package(module: str) -> str:
    """The package a module belongs to: a child of ``moa`` (a subpackage or a top-level module such
    as ``moa.config``), else its install name (``moa_actors``, ``moa_observability``,
    ``moa_serve_app``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "moa" and len(parts) > 1 else parts[0]


def _imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the module imports that make the dependency."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True)
    found: dict[tuple[str, str], list[str]] = {}

    def add(importer: str, imported: str) -> None:
        a, b = _package(importer), _package(imported)
        if a != b and a.split(".")[0] in OURS and b.split(".")[0] in OURS:
            found.setdefault((a, b), []).append(f"{importer} -> {imported}")

    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            add(module, imported)
    for name in _imported_names(APP_FILE):
        if name.split(".")[0] in OURS:
            add(APP, name)
    return found


def _cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycle_between_packages() -> None:
    """No package imports, directly or through others, a package that imports it back: moa's
    subpackages and top-level modules, moa_actors, moa_observability and moa_serve_app."""
    imports = _imports()
    assert ("moa.engine", "moa.cache") in imports  # the graph was read (the engine uses the cache)
    problems = [
        f"{' <-> '.join(component)}: "
        + "; ".join(
            i for (a, b), found in imports.items() if a in component and b in component for i in found
        )
        for component in _cycles(imports)
    ]
    assert not problems, "\n".join(problems)


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: a cycle through three packages is found, and a chain is not one."""
    assert _cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert _cycles([("a", "b"), ("b", "c"), ("a", "c")]) == []


def test_every_package_has_its_place_in_the_contract() -> None:
    """Each package of moa is a layer of the serving path or stands beside it (a forbidden module
    of the "beside" contract); each module of moa_actors is the Ray app's or a tool beside it."""
    contracts = _contracts()
    placed = {
        name.strip() for layer in contracts["layers"]["layers"] for name in layer.replace("|", ":").split(":")
    }
    beside = set(contracts["beside"]["forbidden_modules"])
    ray_app = set(contracts["ray-app"]["source_modules"])
    graph = grimp.build_graph(*PACKAGES)
    unplaced = graph.find_children("moa") - placed - beside
    assert not unplaced, f"place these in [tool.importlinter] (pyproject.toml): {sorted(unplaced)}"
    unplaced = graph.find_children("moa_actors") - ray_app - beside
    assert not unplaced, f"place these in [tool.importlinter] (pyproject.toml): {sorted(unplaced)}"


def test_the_serve_app_module_imports_only_what_serves() -> None:
    """import-linter cannot read moa_serve_app (a module, not a package): it imports nothing that
    stands beside the serving path, and no entry point above it."""
    forbidden = set(_contracts()["beside"]["forbidden_modules"])
    imported = _imported_names(APP_FILE)
    wrong = {name for name in imported for f in forbidden if name == f or name.startswith(f + ".")}
    assert not wrong, sorted(wrong)
    assert {"moa_actors.app", "moa.config"} <= imported  # the file was read
