"""Building the messages each call sees: role prompts, references from earlier layers, trimming.

Every prompt is rendered from ``TemplatesConfig``; placeholders are replaced literally (never with
``str.format``) so braces in user text or model answers are harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moa.plan import TemplatesConfig
from moa.tokens import approx_tokens, truncate_to_tokens
from moa.types import ChatMessage

TRUNCATION_MARK = " [...]"
# A reference is never cut below this many tokens; below it, it is dropped (and the result says so).
MIN_REFERENCE_TOKENS = 32


def render_references(answers: Sequence[str], templates: TemplatesConfig) -> str:
    return "\n\n".join(
        templates.reference.replace("{index}", str(i)).replace("{text}", text)
        for i, text in enumerate(answers, start=1)
    )


def extend_system(messages: Sequence[ChatMessage], addition: str) -> list[ChatMessage]:
    """Add ``addition`` to the system message, keeping the caller's own system text first."""
    if not addition:
        return list(messages)
    if messages and messages[0].role == "system":
        merged = f"{messages[0].content}\n\n{addition}" if messages[0].content else addition
        return [ChatMessage(role="system", content=merged), *messages[1:]]
    return [ChatMessage(role="system", content=addition), *messages]


def role_prompt(role: str | None, templates: TemplatesConfig) -> str:
    if role is None:
        return ""
    # Plans are checked against the config's roles before they run (MoAConfig.unknown_models).
    return templates.roles[role]


def with_references(
    messages: Sequence[ChatMessage],
    answers: Sequence[str],
    templates: TemplatesConfig,
    *,
    refine: bool = False,
    role: str | None = None,
) -> list[ChatMessage]:
    """The messages for a call that builds on earlier answers (aggregator or later-layer proposer)."""
    parts = [role_prompt(role, templates)]
    if answers:
        template = templates.refine_system if refine else templates.aggregate_system
        parts.append(template.replace("{references}", render_references(answers, templates)))
    return extend_system(messages, "\n\n".join(p for p in parts if p))


@dataclass
class Trimmed:
    answers: list[str]
    notes: list[str]


def trim_references(answers: Sequence[str], budget_tokens: int) -> Trimmed:
    """Fit the references into ``budget_tokens``, cutting the longest first.

    Finds the largest per-reference cap such that the capped lengths fit (water-filling), so short
    references are untouched and long ones are shortened to the same length. If even the minimum
    length does not fit, the longest references are dropped. Every change is described in ``notes``.
    """
    sizes = [approx_tokens(a) for a in answers]
    if sum(sizes) <= budget_tokens:
        return Trimmed(list(answers), [])
    notes: list[str] = []
    keep = list(range(len(answers)))
    mark = approx_tokens(TRUNCATION_MARK)
    while keep and MIN_REFERENCE_TOKENS * len(keep) > budget_tokens:
        longest = max(keep, key=lambda i: sizes[i])
        keep.remove(longest)
        notes.append(f"reference {longest + 1} dropped ({sizes[longest]} tokens): budget {budget_tokens}")
    cap = _water_level([sizes[i] for i in keep], budget_tokens)
    out: list[str] = []
    for i in keep:
        if sizes[i] > cap:
            text = truncate_to_tokens(answers[i], max(cap - mark, 1)) + TRUNCATION_MARK
            notes.append(f"reference {i + 1} trimmed from {sizes[i]} to {approx_tokens(text)} tokens")
            out.append(text)
        else:
            out.append(answers[i])
    return Trimmed(out, notes)


def _water_level(sizes: Sequence[int], budget: int) -> int:
    """The largest cap c with sum(min(s, c)) <= budget."""
    remaining, count = budget, len(sizes)
    for s in sorted(sizes):
        if s * count <= remaining:
            remaining -= s
            count -= 1
        else:
            return remaining // count
    return max(sizes, default=0)
