"""Reading a request body's JSON with finite numbers only.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (the JSON grammar does not) and
turns a literal such as ``1e309`` into infinity. Every limit compares against such a number as if
it were one: ``budget_usd: inf`` makes an unlimited key, an ``Infinity`` timeout never fires, a
``NaN`` cap passes every check. So they are refused where the body is read, whatever the field,
before any model is called or any key is written.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Long enough to recognise the number in the message, short enough not to echo a whole body.
SHOWN_CHARS = 32


class NonFiniteNumber(ValueError):
    """The body holds a number that is not a finite float."""


def _constant(name: str) -> float:
    raise NonFiniteNumber(f"request body holds {name}, which is not a finite number")


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= SHOWN_CHARS else literal[: SHOWN_CHARS - 3] + "..."
        raise NonFiniteNumber(f"request body holds the number {shown}, too large to be a finite number")
    return value


def loads_finite(data: bytes | str) -> Any:
    """``json.loads`` that raises ``NonFiniteNumber`` (a ``ValueError``) for any number that is not
    finite. Integers stay integers of any size: a pydantic float field refuses one too large to
    be a float."""
    return json.loads(data, parse_constant=_constant, parse_float=_float)


__all__ = ["NonFiniteNumber", "loads_finite"]
