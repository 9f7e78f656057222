"""One approximate tokenizer for the whole product (budgets, trimming, rate-limit reservations).

Real tokenizers differ per provider and none can be downloaded here; about four characters per
token is the usual rule of thumb for English and is what all estimates use, so they agree.
"""

from __future__ import annotations

from collections.abc import Iterable

CHARS_PER_TOKEN = 4
# Per-message overhead of the chat formats (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 4


def approx_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def approx_message_tokens(contents: Iterable[str]) -> int:
    return sum(approx_tokens(c) + MESSAGE_OVERHEAD_TOKENS for c in contents)


def truncate_to_tokens(text: str, tokens: int) -> str:
    """Cut ``text`` to about ``tokens`` tokens, at a word boundary where one is near."""
    limit = tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut < limit * 0.8:
        cut = limit
    return text[:cut].rstrip()
