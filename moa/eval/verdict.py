"""Reading a judge's verdict out of real model output.

Judges are asked for MT-Bench's markers (``[[A]]``, ``[[B]]``, ``[[C]]`` for a tie; ``[[7]]`` for a
rating), but real models wrap them in markdown, quote the format instruction back before (or
after) answering, or write "Final verdict: Assistant A". A marker that belongs to a quoted format
instruction is not a verdict: one followed by its condition (``"[[A]]" if assistant A is
better``), or one listed beside other markers (``[[A]], [[B]] or [[C]]``). Of the markers left,
the last wins (a model that states a verdict, then corrects it). Without any, a few unambiguous
closing phrases are accepted ("Final verdict: Assistant B", "Verdict: a tie"), where a bare
letter is a label only when it ends its clause or a verb follows ("Verdict: B.", "A is better"):
the English article "a" always has a word after it ("the better answer is a bit longer", "a
close call"), and is never read as answer A. Anything else is ``None``: the caller retries once
with a stricter instruction and counts what still cannot be read, never guessing and never
dropping it silently. ``tests/fixtures/judge_verdicts.json`` holds the real judge outputs this is checked on.

A pair is judged in both orders; :func:`side_preference` and :func:`pair_preference` turn the
two verdicts into one preference, for ``moa eval``'s report and the shadow evaluation alike.
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
# What follows a marker in a format instruction: its condition ("[[A]]" if assistant A is better).
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"  # straight, back and curly quotes
_CONDITION = re.compile(rf"\s*[{_QUOTES}]?\s*(?:if|when)\b", re.IGNORECASE)
# What separates markers listed as the choices: "[[A]], [[B]] or [[C]]", "[[A]]/[[B]]/[[C]]".
_LIST_GAP = re.compile(rf"[\s{_QUOTES},;/|]*(?:(?:and|or)\b[\s{_QUOTES}]*)?", re.I)
# A format instruction's next choice follows its condition within one clause ("... is better, ").
_CLAUSE_GAP = re.compile(r"[^.!?\n]{0,80}")

# A label in a closing phrase: a letter after "assistant" (never an article there), a tie ("a tie"),
# or a bare letter followed by the end of its clause, "'s" or a verb. The article "a" (or "A" at
# the start of a sentence) is always followed by the word it qualifies, so it is never a label.
_AFTER = r"(?=[ \t]*(?:$|[.,;:!?)\]\n])|'s\b|\s+(?:is|was|wins|won)\b)"
_PHRASE = re.compile(
    r"(?i:final\s+verdict|verdict|winner|better\s+(?:answer|response))\s*(?i:is)?\s*[:\-]?\s*\(?"
    r"(?:(?i:assistant)\s+(?P<assistant>[AaBb])(?!\w)"
    r"|(?:(?i:answer|response|output)\s+)?(?P<label>(?i:[abc]))"
    + _AFTER
    + r"|(?:(?i:a)\s+)?(?P<tie>(?i:tie|draw))\b)"
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


def _verdict_markers(text: str) -> tuple[list[str], str]:
    """The markers that are verdicts, and the text with the quoted format's markers blanked out.

    A format instruction quoted back (issue: the last of its markers, ``[[C]]``, read as a tie)
    shows as markers with conditions or listed together; a verdict is a marker on its own,
    "Final verdict: [[C]] for a tie." included.
    """
    found = list(_MARKER.finditer(text))
    quoted: set[int] = set()
    for i, m in enumerate(found):
        if _CONDITION.match(text, m.end()):
            quoted.add(i)
    for i in range(len(found) - 1):
        this, after = found[i], found[i + 1]
        gap = text[this.end() : after.start()]
        if _label(this.group(1)) is _label(after.group(1)):
            continue
        if _LIST_GAP.fullmatch(gap) or (i in quoted and _CLAUSE_GAP.fullmatch(gap)):
            quoted.update({i, i + 1})
    kept = [m.group(1) for i, m in enumerate(found) if i not in quoted]
    blanked = text
    for i in sorted(quoted, reverse=True):
        m = found[i]
        blanked = blanked[: m.start()] + " " * (m.end() - m.start()) + blanked[m.end() :]
    return kept, blanked


def parse_pairwise(text: str) -> Verdict | None:
    """The verdict in a pairwise judge's reply, or ``None`` when it has none."""
    clean = _MARKDOWN.sub("", text)
    markers, rest = _verdict_markers(clean)
    if markers:
        return _label(markers[-1])
    phrases = list(_PHRASE.finditer(rest))
    if not phrases:
        return None
    last = phrases[-1]
    return _label(last.group("assistant") or last.group("label") or "tie")


def side_preference(verdict: str | None, target_shown_first: bool) -> float | None:
    """One order's verdict as a preference for the target (the served answer, in a shadow):
    1 it won, 0 it lost, 0.5 a tie; ``None`` when the verdict could not be read."""
    if verdict is None:
        return None
    if verdict == Verdict.TIE:
        return 0.5
    return 1.0 if (verdict == Verdict.A) == target_shown_first else 0.0


def pair_preference(target_first: float | None, reference_first: float | None) -> float | None:
    """One pair's preference for the target from its two orders, or ``None`` to drop the pair.

    The rule, as MT-Bench's (FastChat's ``show_result.py`` drops every pair whose first or
    swapped game is an "error", i.e. a judgment it could not read): a pair counts only when both
    orders were read. Counting the one order left would let position bias back in (a judge that
    favours the first answer would win every such pair for whichever side it showed first).
    The two orders are then averaged (ties a half): a consistent pair is a win or a loss, a
    contradicting one (each order for the answer shown first) a tie, as in FastChat; a win and a
    tie count 0.75 here, where FastChat calls them a tie.
    """
    if target_first is None or reference_first is None:
        return None
    return (target_first + reference_first) / 2


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a grading judge's reply, or ``None`` when it has none in range."""
    clean = _MARKDOWN.sub("", text)
    found = _RATING_MARKER.findall(clean) or _RATING_PHRASE.findall(clean)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None
