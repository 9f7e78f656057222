"""Reading a judge's verdict out of real model output.

Judges are asked for MT-Bench's markers (``[[A]]``, ``[[B]]``, ``[[C]]`` for a tie; ``[[7]]`` for a
rating), but real models wrap them in markdown, quote the instructions before answering, or write
"Final verdict: Assistant A". The last explicit marker wins (a model that restates the format
first then gives its verdict); without any marker, a few unambiguous closing phrases are accepted.
Anything else is ``None``: the caller retries once with a stricter instruction and counts what
still cannot be read, never dropping it silently.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Verdict(StrEnum):
    A = "A"  # the first answer shown is better
    B = "B"
    TIE = "tie"


PAIRWISE_FORMAT = '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie'
GRADED_FORMAT = '"Rating: [[N]]" with N an integer from 1 to 10'

_MARKER = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_PHRASE = re.compile(
    r"(?:final\s+verdict|verdict|winner|better\s+(?:answer|response))\s*(?:is|:)?\s*[:\-]?\s*"
    r"(?:assistant\s+|answer\s+|response\s+)?\(?\b(A|B|tie|C)\b\)?",
    re.IGNORECASE,
)
_RATING_MARKER = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING_PHRASE = re.compile(
    r"(?:rating|score)\s*(?:is|:)?\s*[:\-]?\s*\[?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.I
)
_MARKDOWN = re.compile(r"[*_`]")


def _label(token: str) -> Verdict:
    t = token.upper()
    if t == "A":
        return Verdict.A
    if t == "B":
        return Verdict.B
    return Verdict.TIE


def parse_pairwise(text: str) -> Verdict | None:
    """The verdict in a pairwise judge's reply, or ``None`` when it has none."""
    clean = _MARKDOWN.sub("", text)
    markers = _MARKER.findall(clean)
    if markers:
        return _label(markers[-1])
    phrases = _PHRASE.findall(clean)
    if phrases:
        return _label(phrases[-1])
    return None


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a grading judge's reply, or ``None`` when it has none in range."""
    clean = _MARKDOWN.sub("", text)
    found = _RATING_MARKER.findall(clean) or _RATING_PHRASE.findall(clean)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None
