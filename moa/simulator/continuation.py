"""How the simulated models continue an answer they are handed the start of.

Two forms reach a model: a trailing assistant message (Anthropic's prefill: the API continues it as
the start of its own answer and returns only what follows), or the partial answer as an assistant
turn followed by a short user turn asking to continue it (any chat API). Either way the model
answers the conversation before the partial answer and returns only what comes after the text it
was given: its own answer's remainder when that answer starts with the same text, otherwise its
own answer from the same length on, from a word boundary, so the joined text reads as one.
"""

from __future__ import annotations

import re

# A user turn asking to continue the previous assistant turn (short, and saying so).
_CONTINUE = re.compile(r"\bcontinue\b", re.IGNORECASE)
_MAX_INSTRUCTION_CHARS = 600

Transcript = tuple[tuple[str, str], ...]


def split_continuation(transcript: Transcript) -> tuple[Transcript, str | None]:
    """The conversation to answer, and the partial answer to continue (None: a fresh answer)."""
    if len(transcript) >= 2 and transcript[-1][0] == "assistant" and transcript[-2][0] == "user":
        return transcript[:-1], transcript[-1][1]
    if len(transcript) >= 3 and transcript[-2][0] == "assistant" and transcript[-1][0] == "user":
        ask = transcript[-1][1]
        if len(ask) <= _MAX_INSTRUCTION_CHARS and _CONTINUE.search(ask):
            return transcript[:-2], transcript[-2][1]
    return transcript, None


def continue_text(full: str, prefix: str) -> str:
    """What follows ``prefix`` in an answer whose complete form would be ``full``."""
    if full.startswith(prefix):
        return full[len(prefix) :]
    rest = full[len(prefix) :]
    cut = re.search(r"\s", rest)
    rest = rest[cut.start() :].lstrip() if cut else ""
    if not rest:
        return ""
    return rest if prefix[-1:].isspace() else " " + rest
