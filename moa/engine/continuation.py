"""Continuing an answer on another model after the stream that was writing it broke.

The client already holds the text sent so far and cannot take it back, so the next aggregator of
the chain is asked to go on from exactly there. Anthropic's Messages API continues a trailing
assistant message as the start of its own answer (a prefill); the other APIs get the text so far
as an assistant turn and a user turn asking them to continue it (``templates.continue_user``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moa.plan import TemplatesConfig
from moa.types import ChatMessage

# Provider kinds whose API treats a trailing assistant message as the beginning of the answer.
PREFIX_KINDS = frozenset({"anthropic"})


@dataclass
class Continuation:
    """The messages for the continuing call, and whether its answer's leading whitespace must go
    (the prefix sent lost its trailing whitespace, which the client already has)."""

    messages: list[ChatMessage]
    trim_leading: bool


def continuation(
    messages: Sequence[ChatMessage], prefix: str, kind: str, templates: TemplatesConfig
) -> Continuation:
    if kind in PREFIX_KINDS:
        # Anthropic refuses a final assistant turn that ends with whitespace.
        stripped = prefix.rstrip()
        if not stripped:
            return Continuation(list(messages), trim_leading=True)
        return Continuation(
            [*messages, ChatMessage(role="assistant", content=stripped)], trim_leading=stripped != prefix
        )
    turns = [
        ChatMessage(role="assistant", content=prefix),
        ChatMessage(role="user", content=templates.continue_user),
    ]
    return Continuation([*messages, *turns], trim_leading=prefix[-1:].isspace())


class LeadingTrim:
    """Drops the whitespace at the start of a continuation, across as many deltas as it spans."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __call__(self, text: str) -> str:
        if not self.active:
            return text
        out = text.lstrip()
        self.active = not out
        return out
