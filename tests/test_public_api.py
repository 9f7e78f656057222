"""The public API declared in ``moa/__init__.py``: every name resolves, and importing it is cheap."""

from __future__ import annotations

import subprocess
import sys

import moa
from moa.caller import ModelCaller
from moa.testing import ScriptedCaller


def test_every_public_name_resolves() -> None:
    assert sorted(moa.__all__) == moa.__all__ and len(set(moa.__all__)) == len(moa.__all__)
    for name in moa.__all__:
        assert getattr(moa, name) is not None, name
    assert set(moa.__all__) <= set(dir(moa))


def test_the_test_double_is_a_model_caller() -> None:
    assert isinstance(ScriptedCaller(), ModelCaller)
    assert moa.ModelCaller is ModelCaller and moa.ScriptedCaller is ScriptedCaller


def test_importing_moa_loads_nothing_until_a_name_is_used() -> None:
    """``import moa`` imports no engine dependency; the first use of a name imports its home only."""
    code = (
        "import sys, moa\n"
        "heavy = ('moa.engine', 'opentelemetry', 'ray', 'openai', 'anthropic')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "moa.Plan\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "False"]
