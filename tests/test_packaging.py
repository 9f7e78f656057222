"""The wheel holds the whole project: every package, its data files, the entry points.

The package list was once kept by hand and left ``moa.cache`` out: an installed wheel then failed
at the first cache import while every test, run from the source tree, passed. This builds a real
wheel from a copy of the sources (a build in the tree would leave ``build/`` behind) and compares
it with the tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moa", "actors", "observability")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "serve_app.py"):
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
    return zipfile.ZipFile(built)


def _tracked(name: str) -> list[Path]:
    return [p for p in (ROOT / name).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_every_package_and_module_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = [str(p.relative_to(ROOT)) for name in PACKAGES for p in _tracked(name) if p.suffix == ".py"]
    missing = [m for m in missing if m not in names]
    assert missing == []
    assert "serve_app.py" in names
    # Every package directory is a package in the wheel (moa.cache was the one left out).
    for name in PACKAGES:
        for d in [d for d in (ROOT / name).rglob("*") if d.is_dir() and any(d.glob("*.py"))]:
            assert f"{d.relative_to(ROOT)}/__init__.py" in names


def test_package_data_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    data = [p for p in _tracked("moa") if p.suffix in (".yaml", ".jsonl")]
    assert data, "the bundled config and data sets are where the test expects them"
    assert [str(p.relative_to(ROOT)) for p in data if str(p.relative_to(ROOT)) not in names] == []


def test_the_wheel_declares_the_cli_and_the_bench_entry_point(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "moa = moa.cli:main" in text
    assert "[moa.bench]" in text and "ray = actors.bench_targets" in text
    assert "ray_cache = actors.cache_bench" in text
    # Nothing but the project: no tests, no build leftovers.
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {*PACKAGES, "serve_app.py"}
