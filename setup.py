"""How the folders install: each under an import name that cannot clash with another distribution.

The folders ``actors/``, ``observability/`` and the file ``serve_app.py`` keep their names in the
repository, but names that generic, installed at the top level of site-packages, collide with any
other distribution shipping an ``actors`` or ``observability`` package (pip lets one overwrite the
other). They install as ``moa_actors``, ``moa_observability`` and ``moa_serve_app`` instead:
``package_dir`` maps each import name to its folder, for the wheel and for ``pip install -e .``
alike (the editable install's import hook reads the same mapping, so a module added to a folder is
importable at once, with no reinstall).

This file exists for the two things pyproject.toml cannot say. The packages are found, not listed
(a hand-kept list once left ``moa.cache`` out of the wheel), and found packages carry their folder
names, so the subpackages of each mapped folder are found and renamed here. And setuptools maps
packages, not modules, to other names: ``BuildPy`` writes ``serve_app.py`` into the wheel as
``moa_serve_app.py``. Everything else about the build is in pyproject.toml.
"""

from __future__ import annotations

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.command.build_py import build_py

# import name -> the folder (or, for a module, the file without ".py") it is installed from.
# .mypy-path/ holds one symlink per entry, so mypy (which runs no import hooks) finds them too.
PACKAGE_FOLDERS = {"moa_actors": "actors", "moa_observability": "observability"}
MODULE_FILES = {"moa_serve_app": "serve_app"}


def _packages() -> list[str]:
    # Namespace discovery, so that moa/data (data files, no __init__.py) is a package of its own:
    # setuptools warns at every build about an importable folder left out of `packages`.
    found = find_namespace_packages(include=["moa", "moa.*"], exclude=["*.__pycache__"])
    for name, folder in PACKAGE_FOLDERS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(where=folder))]
    return found


class BuildPy(build_py):
    """Builds a top-level module from the file its import name maps to in ``package_dir``."""

    # Set by distutils' finalize_options from setup(py_modules=...); declared here for mypy.
    py_modules: list[str] | None

    def find_modules(self) -> list[tuple[str, str, str]]:
        listed = list(self.py_modules or [])
        mapped = [m for m in listed if m in MODULE_FILES]
        # distutils would look for <import name>.py and warn that it is missing.
        self.py_modules = [m for m in listed if m not in MODULE_FILES]
        try:
            modules: list[tuple[str, str, str]] = super().find_modules()
        finally:
            self.py_modules = listed
        for name in mapped:
            source = f"{MODULE_FILES[name]}.py"
            if self.check_module(name, source):
                modules.append(("", name, source))
        return modules


setup(
    packages=_packages(),
    py_modules=list(MODULE_FILES),
    # The editable install's finder resolves a module's entry by trying "<path>.py".
    package_dir={**PACKAGE_FOLDERS, **MODULE_FILES},
    cmdclass={"build_py": BuildPy},
)
