"""The wheel holds the whole project: every package, its data files, the entry points.

The package list was once kept by hand and left ``moa.cache`` out: an installed wheel then failed
at the first cache import while every test, run from the source tree, passed. This builds a real
wheel from a copy of the sources (a build in the tree would leave ``build/`` behind) and compares
it with the tree.

The folders ``actors/``, ``observability/`` and ``serve_app.py`` install under import names of
their own (``moa_actors``, ``moa_observability``, ``moa_serve_app``: setup.py), so that no other
distribution's ``actors`` or ``observability`` package can overwrite them in site-packages or be
overwritten by them.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the import name it installs under
PACKAGES = {"moa": "moa", "actors": "moa_actors", "observability": "moa_observability"}
MODULES = {"serve_app.py": "moa_serve_app.py"}
# The names the folders would install under if left to themselves: generic enough for another
# distribution to ship.
CLASHING = {"actors", "observability", "serve_app.py"}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    """The wheel, and what the build printed (pip shows the backend's warnings even with -q)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", *MODULES):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        ".",
    ]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("moa_serve-*.whl")
    return zipfile.ZipFile(built), done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(build: tuple[zipfile.ZipFile, str]) -> zipfile.ZipFile:
    return build[0]


def _tracked(name: str) -> list[Path]:
    return [p for p in (ROOT / name).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def _installed_as(path: Path) -> str:
    """Where a file of the tree lands in the wheel: its folder replaced by the import name."""
    folder, *rest = path.relative_to(ROOT).parts
    return "/".join([PACKAGES[folder], *rest])


def test_every_package_and_module_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    expected = [_installed_as(p) for name in PACKAGES for p in _tracked(name) if p.suffix == ".py"]
    assert [m for m in expected if m not in names] == []
    assert set(MODULES.values()) <= names
    # Every package directory is a package in the wheel (moa.cache was the one left out).
    for name in PACKAGES:
        for d in [d for d in (ROOT / name).rglob("*") if d.is_dir() and any(d.glob("*.py"))]:
            assert f"{_installed_as(d)}/__init__.py" in names


def test_package_data_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    data = [p for p in _tracked("moa") if p.suffix in (".yaml", ".jsonl")]
    assert data, "the bundled config and data sets are where the test expects them"
    assert [_installed_as(p) for p in data if _installed_as(p) not in names] == []


def test_the_wheel_declares_the_cli_and_the_bench_entry_point(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "moa = moa.cli.main:main" in text
    # The HAProxy launcher a cluster's `ray start` names (docs/OPERATIONS.md).
    assert "moa-haproxy = moa_actors.haproxy_launcher:main" in text
    assert "[moa.bench]" in text and "ray = moa_actors.bench_targets" in text
    assert "ray_cache = moa_actors.cache_bench" in text
    # Nothing but the project: no tests, no build leftovers.
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {*PACKAGES.values(), *MODULES.values()}


def test_the_build_prints_no_warning(build: tuple[zipfile.ZipFile, str]) -> None:
    """setuptools' warnings are about builds that stop working: the licence as a TOML table
    (deprecated; such builds fail from February 2027) and a data folder left out of ``packages``
    were printed at every install. The licence is an SPDX expression in the metadata."""
    wheel, output = build
    assert "Warning" not in output, output
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in wheel.read(metadata).decode()


def test_no_top_level_name_another_distribution_could_ship(wheel: zipfile.ZipFile) -> None:
    """Every top-level name in the wheel is the project's own: ``moa`` or ``moa_``-prefixed."""
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops & CLASHING == set()
    assert {t for t in tops if t != "moa" and not t.startswith("moa_")} == set()


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_imports_a_folder_by_its_folder_name() -> None:
    """Run from the repository root, ``import actors`` still finds the folder (the root is on
    ``sys.path``) while an installed copy has no such module: the old names must not come back."""
    sources = [p for name in (*PACKAGES, "tests") for p in _tracked(name) if p.suffix == ".py"]
    sources += [ROOT / m for m in MODULES] + [ROOT / "setup.py"]
    old = {"actors", "observability", "serve_app"}
    stale = {str(p.relative_to(ROOT)): n for p in sources if (n := _imported_names(p) & old)}
    assert stale == {}


def test_the_mypy_links_match_the_install_names() -> None:
    """mypy finds the mapped packages through .mypy-path/ (it runs no import hooks): one link per
    import name, to the folder setup.py installs under that name."""
    links = {p.name: p.resolve() for p in (ROOT / ".mypy-path").iterdir()}
    expected = {new: (ROOT / old).resolve() for old, new in PACKAGES.items() if old != new}
    expected |= {new: (ROOT / old).resolve() for old, new in MODULES.items()}
    assert links == expected


def test_a_module_added_to_a_folder_imports_without_a_reinstall(tmp_path: Path) -> None:
    """The editable install maps ``moa_actors`` to the folder itself, not to a copy or a link tree
    of the files present at install time: a new file under ``actors/`` is importable at once. A
    fresh interpreter outside the repository (so not through the root on ``sys.path``) finds the
    package's submodules in ``actors/`` itself, which is where Python looks for a module added
    later. Nothing is written into the source tree to show it."""
    moa_actors = pytest.importorskip("moa_actors")
    if Path(moa_actors.__file__ or "").resolve().parent != ROOT / "actors":
        pytest.skip("moa_actors is not installed in editable mode from this tree")
    code = (
        "import importlib.util, json; s = importlib.util.find_spec('moa_actors'); "
        "print(json.dumps(list(s.submodule_search_locations)))"
    )
    # Without PYTHONPATH: what the install itself maps, not a path a developer put in front of it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    (where,) = [Path(p).resolve() for p in json.loads(done.stdout)]
    if where != ROOT / "actors" and (where.parent / "setup.py").exists():
        pytest.skip(f"moa_actors is installed in editable mode from another checkout ({where.parent.name})")
    assert where == ROOT / "actors"
