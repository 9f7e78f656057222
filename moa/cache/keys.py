"""Cache keys: what determines an answer, normalised and hashed.

A final answer is keyed by the scope (whose cache it is), the normalised messages, the plan that
runs after routing (its aggregator chain included), and the generation parameters; a proposer call
by its own request (provider, model, messages, parameters). Normalising only removes differences
no model can see in meaning (line endings, trailing spaces, Unicode composition); case and inner
whitespace (code indentation) are kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from moa.plan import Plan
from moa.types import CallRequest, ChatMessage, GenerationParams, ResponseFormat, ToolSet

# Bump when the key's composition or an entry's layout changes: old entries then never match.
KEY_VERSION = 1


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def normalise_messages(messages: Sequence[ChatMessage]) -> list[list[str]]:
    """Each message as it counts for a key: role and normalised text, and (only where present, so
    keys of plain conversations are unchanged) the calls an assistant turn made, the call a tool
    result answers, or the images a user turn carries (each by a hash of its bytes, or of its
    URL, and its detail)."""
    out = []
    for m in messages:
        item = [m.role, normalise_text(m.content)]
        if m.tool_calls:
            item.append(json.dumps([c.model_dump() for c in m.tool_calls], sort_keys=True))
        if m.tool_call_id is not None:
            item.append(f"{m.tool_call_id}|{m.name or ''}")
        if m.images:
            item.append("images:" + ",".join(f"{i.digest()}|{i.detail}" for i in m.images))
        out.append(item)
    return out


def _tools(tools: ToolSet | None, response_format: ResponseFormat | None = None) -> dict[str, Any]:
    """The tool definitions, choice and parallel switch, and the response format (its type, name,
    schema and strict switch), as a key reads them (nothing without them, so keys of requests
    without tools or a format are unchanged)."""
    found: dict[str, Any] = {} if tools is None else {"tools": tools.model_dump(mode="json")}
    if response_format is not None:
        found["response_format"] = response_format.model_dump(mode="json")
    return found


def _digest(obj: Any) -> str:
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def _params(params: GenerationParams) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude_none=True)


def final_key(
    scope: str,
    messages: Sequence[ChatMessage],
    plan: Plan,
    params: GenerationParams,
    tools: ToolSet | None = None,
    response_format: ResponseFormat | None = None,
) -> str:
    """The exact key of a final answer."""
    return _digest(
        {
            "v": KEY_VERSION,
            "scope": scope,
            "messages": normalise_messages(messages),
            "plan": plan.model_dump(mode="json"),
            "params": _params(params),
            **_tools(tools, response_format),
        }
    )


def proposal_key(scope: str, req: CallRequest) -> str:
    """The exact key of one proposer call (its timeout and role label change nothing it returns)."""
    return _digest(
        {
            "v": KEY_VERSION,
            "scope": scope,
            "provider": req.provider,
            "model": req.model,
            "messages": normalise_messages(req.messages),
            "params": _params(req.params),
            **_tools(req.tools, req.response_format),
        }
    )


def split_last_user(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], str] | None:
    """(everything but the last user message, its text); None if the last message is not the
    user's (nothing to rephrase then), or carries images (a question about an image is the same
    question only about the same image, which no text similarity can tell)."""
    if not messages or messages[-1].role != "user" or messages[-1].images:
        return None
    return list(messages[:-1]), messages[-1].content


def context_key(
    scope: str,
    context: Sequence[ChatMessage],
    plan: Plan,
    params: GenerationParams,
    tools: ToolSet | None = None,
    response_format: ResponseFormat | None = None,
) -> str:
    """What must be identical for a semantic hit: scope, system prompt and earlier turns, plan and
    parameters. Entries sharing it are the candidates for a similarity scan."""
    return _digest(
        {
            "v": KEY_VERSION,
            "scope": scope,
            "context": normalise_messages(context),
            "plan": plan.model_dump(mode="json"),
            "params": _params(params),
            **_tools(tools, response_format),
        }
    )


# -- anchors: what two questions must share, however close their embeddings ----------------------

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:\s?%)?")
_NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "neither",
        "nor",
        "without",
        "cannot",
        "can't",
        "don't",
        "doesn't",
        "didn't",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "won't",
        "wouldn't",
        "shouldn't",
        "couldn't",
        "mustn't",
        "hasn't",
        "haven't",
        "hadn't",
    ]
)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'+#.-]*[A-Za-z0-9+#]|[A-Za-z]")
_QUOTED = re.compile(r"\"([^\"]{1,80})\"|`([^`]{1,80})`|'([^'\s][^']{0,78}[^'\s])'")
# Words that open sentences or questions and so are capitalised without naming anything.
_COMMON_CAPITALISED = frozenset(
    [
        "a",
        "an",
        "the",
        "i",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "is",
        "are",
        "was",
        "were",
        "do",
        "does",
        "did",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "please",
        "explain",
        "describe",
        "write",
        "tell",
        "give",
        "list",
        "compare",
        "summarize",
        "summarise",
        "suggest",
        "name",
        "find",
        "imagine",
        "draft",
        "create",
        "make",
        "help",
        "show",
        "provide",
        "in",
        "on",
        "at",
        "for",
        "of",
        "to",
        "from",
        "by",
        "with",
        "as",
        "if",
        "and",
        "or",
        "but",
        "so",
        "then",
        "also",
        "now",
        "here",
        "there",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "my",
        "your",
        "our",
        "their",
        "his",
        "her",
    ]
)


def _is_negation(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't")


def _sentence_start(text: str, at: int) -> bool:
    before = text[:at].rstrip(" \t\"'(*-")
    return not before or before[-1] in ".!?:\n"


def anchors(text: str) -> dict[str, list[str]]:
    """Numbers, negations, names (capitalised words past a sentence's start, acronyms, code-like
    tokens) and quoted strings: questions that differ in any of these need different answers,
    however similar they read. Embeddings (static ones most of all) barely see such differences,
    so a semantic hit requires these to be equal."""
    t = normalise_text(text)
    numbers = sorted({n.replace(",", "").replace(" ", "") for n in _NUMBER.findall(t)})
    found = list(_WORD.finditer(t))
    negations = sorted({m.group().lower() for m in found if _is_negation(m.group().lower())})
    names: list[str] = []  # in order: "Fahrenheit to Celsius" is not "Celsius to Fahrenheit"
    for m in found:
        w = m.group()
        if w.lower() in _COMMON_CAPITALISED:
            continue
        coded = any(c.isdigit() for c in w) or "_" in w or "." in w[1:-1] or "#" in w or "+" in w
        acronym = len(w) > 1 and w.isupper()
        capitalised = w[0].isupper() and not _sentence_start(t, m.start())
        if (coded or acronym or capitalised) and w.lower() not in names:
            names.append(w.lower())
    quoted = sorted({next(g for g in m if g) for m in _QUOTED.findall(t)})
    return {"numbers": numbers, "negations": negations, "names": names, "quoted": quoted}


# Words that carry no content of their own in a question: function words and the verbs of asking.
_FUNCTION_WORDS = _COMMON_CAPITALISED | frozenset(
    [
        "you",
        "me",
        "us",
        "some",
        "any",
        "about",
        "into",
        "over",
        "way",
        "ways",
        "best",
        "good",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "get",
        "there",
        "out",
        "up",
        "one",
        "ones",
        "please",
        "could",
        "know",
        "want",
        "need",
        "like",
        "just",
        "really",
        "very",
        "the",
        "thing",
        "things",
        "theme",
        "kind",
        "explain",
        "describe",
        "tell",
        "give",
        "show",
        "let",
        "s",
        "whats",
        "what's",
        "ve",
        "re",
        "d",
        "ll",
        "m",
        "t",
        "mean",
        "meaning",
        "short",
        "brief",
    ]
)


def _stem(word: str) -> str:
    """A crude English stem, enough to equate "handles"/"handled"/"handling"/"handle"."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)].rstrip("e")
    return word.rstrip("e") if len(word) > 4 else word


def content_words(text: str) -> list[str]:
    """The stems of a question's content words (function words and asking verbs left out)."""
    words = (m.group().lower().strip("'.") for m in _WORD.finditer(normalise_text(text)))
    return sorted({_stem(w) for w in words if w and w not in _FUNCTION_WORDS})


def guard(text: str) -> dict[str, list[str]]:
    """What two questions must share for one's answer to serve the other, however similar their
    embeddings: the anchors, and the same content words (up to inflection). Rephrasings that
    reorder a question or change how it asks pass; those that swap a content word do not (an
    antonym, another topic, a synonym too: a miss costs a model call, a wrong hit a wrong answer)."""
    return {**anchors(text), "words": content_words(text)}
