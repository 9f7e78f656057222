"""Deterministic, plausible answers: prose about the user's question, in a per-model style.

The same (model, messages, seed) always gives the same text, so tests and benchmarks are
repeatable; different models word things differently. Requests that carry ``<reference id="N">``
blocks (MoA aggregators, later layers, refine rounds) get a visible fusion of those references,
which is how tests prove that earlier answers reached the aggregator.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from moa.tokens import approx_tokens

_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each explain few for from
    further give had has have having he her here hers herself him himself his how i if in into is it
    its itself just let me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own please same she should so some such tell than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves describe
    using use used way ways thing things get make many much really like know want need one two
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_GENERIC_TERMS = ("context", "timing", "scale", "cost", "reliability", "the details")

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9+#'-]*|[^\sA-Za-z]+")
# Common verbs: a key term is a run of content words, and a verb ends the run.
_VERB_TEXT = """
    affect affects apply applies avoid build builds cause causes change changes choose compare compares
    compute create creates decide define deal differ differs find fix handle handles help helps implement
    improve improves increase increases learn learns lead leads mean means prevent prevents protect protects
    reduce reduces run runs scale scales show solve train trains turn turns work works write become becomes
    keep keeps matter matters relate relates happen happens look looks feel feels think go goes come comes
"""
_VERBS = frozenset(_VERB_TEXT.split())
_POLITE = re.compile(
    r"^(?:(?:please|can you|could you|would you|explain|describe|tell me|give me|write|summari[sz]e|"
    r"compare|list|outline)\b[\s,:]*)+",
    re.IGNORECASE,
)
_WH = re.compile(
    r"^(?:(what|who)(?:'s| is| are| was| were)|(how|why|when|where)(?: do| does| did)?)\b\s*", re.I
)
_REFERENCE = re.compile(r'<reference id="(\d+)">\n(.*?)\n</reference>', re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_BULLET = re.compile(r"^(\s*(?:[-*\u2022]|\d+[.)])\s+)")
_WORD_LIMIT = re.compile(
    r"answer with (one|two|three|four|five|\d+) words? only|respond with (?:only |just )?(one|two|three|"
    r"four|five|\d+) words?",
    re.IGNORECASE,
)
_OPTIONS = re.compile(r"\(([^()]*\bor\b[^()]*)\)")
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}

# -- vocabulary --------------------------------------------------------------------------------------

_SENTENCES = (
    "At its core, {topic} comes down to how {a} interacts with {b}.",
    "The most important factor here is {a}, because it shapes everything that follows.",
    "A useful way to think about {a} is as a trade-off between {b} and {c}.",
    "In practice, {a} rarely works in isolation, and {b} usually plays a supporting role.",
    "One common misconception is that {a} is simple, when in fact it depends heavily on {b}.",
    "Evidence from many real-world cases suggests that {a} matters more than people expect.",
    "If you are starting out, focus first on {a} and only then worry about {b}.",
    "It helps to separate the question of {a} from the question of {b}.",
    "A concrete example makes this clearer: consider how {a} changes when {b} is pushed to its limits.",
    "Experts broadly agree on the role of {a}, but they still debate the finer details of {b}.",
    "The relationship between {a} and {b} is not linear, which is why simple rules of thumb mislead.",
    "Over time, small changes in {a} tend to compound into large differences in {c}.",
    "There are edge cases as well, for instance when {b} is missing or unreliable.",
    "Measuring {a} directly is often hard, so people rely on proxies such as {b}.",
    "The mechanism behind {a} is well understood, even if its interaction with {c} is subtler.",
    "This is also why {b} deserves attention whenever {a} comes up.",
    "Seen from a practical angle, the goal is to make {a} predictable rather than perfect.",
    "Historically, thinking about {a} has moved from intuition toward careful measurement.",
    "Another point worth noting is that {c} can amplify the effect of {a}.",
    "The trade-offs become clearer once you write down what {a} costs and what it buys.",
    "Most of the confusion around {a} disappears once {b} is defined precisely.",
    "When {a} goes wrong, the cause can usually be traced back to {b}.",
    "A good mental model treats {a} as the input and {c} as the outcome you actually care about.",
    "Different sources emphasise different aspects of {a}, but they converge on the same core idea.",
    "In most settings, {b} acts as a constraint on how far {a} can be pushed.",
    "The details vary from case to case, yet the role of {a} stays remarkably consistent.",
    "It is worth checking assumptions about {b} before drawing firm conclusions about {a}.",
    "Put simply, {a} sets the direction while {b} determines the pace.",
    "Getting {a} right early tends to save a great deal of effort later on.",
    "A careful look at {c} often reveals why {a} behaves the way it does.",
    "Because {a} and {b} influence each other, changing one usually shifts the other.",
    "The strongest arguments about {a} are the ones backed by clear observations of {b}.",
)
_BULLETS = (
    "**{A}**: the starting point, and the part most worth getting right.",
    "**{A}**: it interacts with {b} in ways that are easy to underestimate.",
    "**{A}**: usually the main source of variation in the outcome.",
    "**{A}**: worth measuring before changing anything else.",
    "**{A}**: where most practical mistakes tend to happen.",
    "**{A}**: the factor that ties {b} and {c} together.",
    "**{A}**: simple in principle, subtle in the details.",
    "**{A}**: often overlooked, yet it constrains everything else.",
)


@dataclass(frozen=True, slots=True)
class Style:
    """How one model tends to answer: how it opens, whether it lists points, how it closes."""

    openers: tuple[str, ...]
    closers: tuple[str, ...]
    bullets: bool
    paragraph_sentences: tuple[int, int]
    fusion_closer: str | None


STYLES: dict[str, Style] = {
    "direct": Style(
        openers=(
            "Short answer: {topic} depends mostly on {a} and {b}.",
            "In brief, {a} is the key to {topic}.",
        ),
        closers=("In short, keep {a} in view and the rest follows.",),
        bullets=False,
        paragraph_sentences=(2, 4),
        fusion_closer="In short, the answers agree on the essentials of {topic}.",
    ),
    "structured": Style(
        openers=(
            "Here is a structured overview of {topic}.",
            "Let's break {topic} down into its main parts.",
        ),
        closers=("**Bottom line:** {a} matters most, with {b} close behind.",),
        bullets=True,
        paragraph_sentences=(2, 3),
        fusion_closer="**Bottom line:** the merged answers give a consistent picture of {topic}.",
    ),
    "conversational": Style(
        openers=("Great question! There is more to {topic} than it first seems.", "Happy to help with this."),
        closers=("I hope this helps, and I am happy to go deeper on any part of it.",),
        bullets=False,
        paragraph_sentences=(2, 4),
        fusion_closer=None,
    ),
    "academic": Style(
        openers=(
            "To address this question, it is useful to first define the terms involved in {topic}.",
            "The question of {topic} can be examined from several complementary perspectives.",
        ),
        closers=("In summary, {a} and {b} jointly account for most of what is observed.",),
        bullets=False,
        paragraph_sentences=(3, 5),
        fusion_closer="In summary, the combined evidence supports a coherent account of {topic}.",
    ),
    "concise": Style(
        openers=("{A} is the heart of it.",),
        closers=(),
        bullets=False,
        paragraph_sentences=(3, 6),
        fusion_closer=None,
    ),
    "thoughtful": Style(
        openers=(
            "This is a nuanced topic, so let me walk through it carefully.",
            "There is a simple answer and a more careful one; both are worth having.",
        ),
        closers=(
            "The honest answer is that it depends on {a}, but the principles above hold in most cases.",
        ),
        bullets=True,
        paragraph_sentences=(3, 4),
        fusion_closer="Taken together, these perspectives complement each other on {topic}.",
    ),
}
# The bundled config's models get distinct, characteristic styles; others are chosen by family.
_KNOWN_STYLES = {
    "gpt-4.1": "structured",
    "gpt-4.1-mini": "direct",
    "gpt-4o-mini": "concise",
    "claude-sonnet-4-6": "thoughtful",
    "claude-haiku-4-5": "conversational",
    "gemini-2.5-pro": "academic",
    "gemini-2.5-flash": "direct",
}
_FAMILY_STYLES = (
    ("gpt", ("structured", "direct", "concise")),
    ("o1", ("structured", "direct")),
    ("o3", ("structured", "direct")),
    ("o4", ("structured", "direct")),
    ("claude", ("thoughtful", "conversational")),
    ("gemini", ("academic", "structured", "direct")),
)


def stable_hash(*parts: object) -> int:
    """A hash that, unlike hash(), is the same in every process."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big")


@lru_cache(maxsize=1024)
def style_for(model: str) -> str:
    """The model's default style: stable per name, chosen among its family's habits."""
    if model in _KNOWN_STYLES:
        return _KNOWN_STYLES[model]
    low = model.lower()
    for prefix, names in _FAMILY_STYLES:
        if low.startswith(prefix):
            return names[stable_hash(model) % len(names)]
    ordered = sorted(STYLES)
    return ordered[stable_hash(model) % len(ordered)]


# -- reading the question ----------------------------------------------------------------------------


def keywords(text: str, limit: int = 8) -> list[str]:
    """Key terms of a question, as runs of up to two content words ("immune system")."""
    terms: dict[str, None] = {}
    run: list[str] = []

    def flush() -> None:
        if run:
            terms.setdefault(" ".join(run[-2:]), None)
            run.clear()

    for w in _WORD.findall(text):
        lw = w.lower().strip("'-")
        if len(lw) >= 3 and lw[0].isalpha() and lw not in _STOPWORDS and lw not in _VERBS:
            run.append(lw)
        else:
            flush()
        if len(terms) >= limit:
            break
    flush()
    return list(terms)[:limit]


def topic_phrase(question: str) -> str:
    """A short phrase naming what the question is about ("how vaccines train the immune system")."""
    first = re.split(r"(?<=[.!?])\s|\n", question.strip(), maxsplit=1)[0]
    stripped = _POLITE.sub("", first).strip()
    m = _WH.match(stripped)
    if m:
        stripped = (m.group(2).lower() + " " if m.group(2) else "") + stripped[m.end() :]
    words = stripped.strip(" ?.!:;,\"'").split()[:9]
    if not words:
        kw = keywords(question, 2)
        return " and ".join(kw) if kw else "this question"
    return " ".join(words)


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


# -- answers -----------------------------------------------------------------------------------------


def fuse_references(blocks: Sequence[tuple[str, str]], style: Style, topic: str) -> str:
    """The aggregator's answer: a header naming the references, then their distinct sentences."""
    ids = [i for i, _ in blocks]
    parts = [f"Synthesis of {len(blocks)} references (merged: {', '.join(ids)})."]
    seen: set[str] = set()
    for _, text in blocks:
        paragraphs: list[list[str]] = [[]]
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                if paragraphs[-1]:
                    paragraphs.append([])
                continue
            if line.startswith("Synthesis of "):
                continue  # a nested fusion's header: this answer has its own
            m = _BULLET.match(line)
            prefix = m.group(1).strip() + " " if m else ""
            body = line[m.end() :] if m else line
            kept = []
            for sentence in _SENTENCE_END.split(body):
                norm = " ".join(sentence.lower().split())
                if norm and norm not in seen:
                    seen.add(norm)
                    kept.append(sentence)
            if kept:
                paragraphs[-1].append(prefix + " ".join(kept))
        parts.extend("\n".join(p) for p in paragraphs if p)
    if style.fusion_closer:
        parts.append(style.fusion_closer.format(topic=topic))
    return "\n\n".join(parts)


def _short_answer(prompt: str, count: int, rng: random.Random) -> str:
    """Answers to 'answer with N words only' prompts, picking from the options offered in brackets."""
    groups = [re.split(r",\s*|\s+or\s+", g.strip()) for g in _OPTIONS.findall(prompt)]
    words = [rng.choice([w.strip() for w in g if w.strip()]) for g in groups[:count] if g]
    words += keywords(prompt, count)[: count - len(words)]
    return " ".join(words[:count]) or "unclear"


def _prose(question: str, style: Style, rng: random.Random, target: int) -> str:
    kws = keywords(question)
    fillers = [g for g in _GENERIC_TERMS if g not in kws]
    rng.shuffle(fillers)
    kws += fillers[: max(0, 3 - len(kws))]
    topic = topic_phrase(question)

    def slots() -> dict[str, str]:
        a, b, c = rng.sample(kws, 3)
        return {"a": a, "b": b, "c": c, "A": _capitalise(a), "topic": topic}

    order = list(_SENTENCES)
    rng.shuffle(order)
    pick = iter(order * 4)
    opener = _capitalise(rng.choice(style.openers).format(**slots()))
    closer = _capitalise(rng.choice(style.closers).format(**slots())) if style.closers else ""
    paragraphs: list[str] = [opener]
    used = approx_tokens(opener) + approx_tokens(closer)
    bullets_done = not style.bullets
    while used < target:
        if not bullets_done and len(paragraphs) >= 2:
            heads = kws[: rng.randint(3, 5)]
            items = rng.sample(_BULLETS, k=len(heads))
            block = "\n".join(
                "- " + b.format(**{**slots(), "A": _capitalise(h)}) for b, h in zip(items, heads, strict=True)
            )
            paragraphs.append(block)
            used += approx_tokens(block)
            bullets_done = True
            continue
        n = rng.randint(*style.paragraph_sentences)
        sentences = []
        for _ in range(n):
            s = _capitalise(next(pick, _SENTENCES[0]).format(**slots()))
            sentences.append(s)
            used += approx_tokens(s) + 1
            if used >= target:
                break
        paragraphs.append(" ".join(sentences))
    if closer:
        paragraphs.append(closer)
    return "\n\n".join(paragraphs)


def _default_length(model: str, prompt_tokens: int, rng: random.Random) -> int:
    verbosity = 0.6 + (stable_hash("verbosity", model) % 800) / 1000  # 0.6 .. 1.4, fixed per model
    base = 120 + min(prompt_tokens, 600) * 0.25
    return max(60, min(400, round(base * verbosity * rng.uniform(0.8, 1.2))))


@lru_cache(maxsize=512)
def compose(
    model: str,
    style_name: str,
    transcript: tuple[tuple[str, str], ...],
    seed: int | None,
    output_tokens: tuple[int, int] | None,
) -> str:
    """The full answer before stop sequences and max_tokens are applied.

    ``transcript`` is every message as (role, text), system first; the last user message is the
    question. It is a tuple so the result can be cached: benchmarks repeat the same prompts.
    """
    style = STYLES[style_name]
    rng = random.Random(stable_hash(model, transcript, seed))
    question = next(
        (t for r, t in reversed(transcript) if r == "user"), transcript[-1][1] if transcript else ""
    )
    everything = "\n".join(t for _, t in transcript)
    blocks = _REFERENCE.findall(everything)
    if blocks:
        return fuse_references(blocks, style, topic_phrase(question))
    limit = _WORD_LIMIT.search(everything)
    if limit:
        word = (limit.group(1) or limit.group(2)).lower()
        return _short_answer(question or everything, _NUMBERS.get(word) or int(word), rng)
    if output_tokens is not None:
        target = rng.randint(*output_tokens)
    else:
        target = _default_length(model, sum(approx_tokens(t) for _, t in transcript), rng)
    return _prose(question, style, rng, target)
