"""The suite's warning filters (pyproject.toml's ``filterwarnings``): a warning raised by the
project's own modules fails the test that raised it, while others' warnings are filtered one by
one, each with its reason. The suite once printed 151 warnings, among them some of ours that
nobody read; now a new one of ours cannot scroll past."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A test file whose tests warn as if from a given module: ``warnings`` attributes a warning to
# the module named by the ``__name__`` of the frame that raised it.
SCRATCH = """
import pytest

@pytest.mark.parametrize("module", {modules!r})
def test_warns(module):
    exec("import warnings; warnings.warn('a new warning', {category})", {{"__name__": module}})
"""

OURS = ["moa", "moa.engine.engine", "moa_actors.ingress", "moa_observability.tracing", "moa_serve_app"]
# Names that merely start like ours, and a library's.
THEIRS = ["moabc", "moa_other.x", "somelib.sub"]


@pytest.mark.parametrize("category", ["UserWarning", "DeprecationWarning", "RuntimeWarning"])
def test_a_warning_from_our_own_modules_fails_the_suite(tmp_path: Path, category: str) -> None:
    scratch = tmp_path / "test_scratch.py"
    scratch.write_text(SCRATCH.format(modules=OURS + THEIRS, category=category))
    config = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *config, "-q", str(scratch)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    failed = {
        line.split("[", 1)[1].split("]", 1)[0]
        for line in done.stdout.splitlines()
        if line.startswith("FAILED")
    }
    assert failed == set(OURS), done.stdout
