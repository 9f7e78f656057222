"""Structured outputs, whatever the wire: the JSON document a simulated model writes for a schema.

Each protocol module parses its own way of asking for JSON (OpenAI's ``response_format``,
Anthropic's ``output_config.format``, Gemini's ``responseMimeType`` with ``responseSchema`` or
``responseJsonSchema``) into an ``OutputFormat``, refusing the schemas its API refuses; this
module writes the document, deterministically (the same model, conversation, schema and seed
always give the same document), so what validation and voting are worth can be measured:

- values come from the last user message where it offers them, as tool arguments do
  (``moa.simulator.tools``): quoted values, then proper nouns, numbers, the enum value it
  mentions, an e-mail address for a property named like one; a property named like prose
  (``answer``, ``summary``, ``explanation``...) gets a sentence of the model's own answer;
  booleans are true when the message mentions the property; everything else is filled within the
  schema's bounds. Every declared property is written (required or not), ``$ref``/``$defs``,
  ``anyOf``/``oneOf`` (the first non-null branch), ``allOf``, ``const``, arrays (three items unless
  ``minItems``/``maxItems`` say otherwise), nested objects and Gemini's upper-case types and
  ``propertyOrdering`` are followed;
- ``json_object`` (or Gemini's JSON without a schema) gets a small object derived from the
  question: ``answer``, ``topic`` and ``keywords``;
- a model's ``JsonErrors`` (its profile) inject what a validator or a quorum exists to catch, each
  at its own rate: malformed JSON, a schema violation (a required field missing, a value of the
  wrong type, a value outside an enum), a refusal. A format whose decoding is held to the schema
  (``OutputFormat.strict``: OpenAI's strict ``json_schema``, any Gemini schema, Anthropic's
  ``output_config.format``) never writes malformed or off-schema JSON; it can still refuse.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moa.simulator.profile import JsonErrors
from moa.simulator.text import compose, keywords, stable_hash
from moa.simulator.tools import NUMBER, PROPER, QUOTED, mentions, mistyped, schema_type
from moa.tokens import approx_tokens

# The kinds of error a model makes in a structured answer, in the order their draws are made.
ERROR_KINDS: tuple[str, ...] = tuple(JsonErrors.model_fields)
# What a model says when it refuses (OpenAI's Structured Outputs guide's refusal, word for word).
REFUSAL = "I'm sorry, I cannot assist with that request."
# How deep a document goes before a recursive schema is cut short.
MAX_DEPTH = 8
# Property names whose value is prose: a sentence of the model's answer rather than one word.
_PROSE = frozenset(
    {
        "answer", "final_answer", "summary", "description", "explanation", "reason", "reasoning",
        "rationale", "text", "content", "response", "message", "details", "comment", "comments",
        "notes", "note", "justification", "analysis", "abstract", "body", "output", "result",
    }
)  # fmt: skip
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORDS = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What a request asks the answer to be: a JSON object, or a document for ``schema``."""

    kind: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str = ""
    # Decoding held to the schema (OpenAI strict, Gemini, Anthropic): never malformed or off-schema.
    strict: bool = False
    # Claude writes required properties first, then the optional ones (each in schema order).
    required_first: bool = False

    @property
    def tokens(self) -> int:
        """The schema's size in prompt tokens: the APIs put it in the prompt and bill it."""
        if self.schema is None:
            return 0
        return approx_tokens(json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False))

    def summary(self) -> dict[str, Any]:
        """What ``GET /admin/requests`` shows of it."""
        return {"type": self.kind, "name": self.name or None, "strict": self.strict}


@dataclass(frozen=True, slots=True)
class Document:
    """What the model writes: the document's text (or its refusal), and the error injected, if any."""

    text: str
    refused: bool = False
    fault: str | None = None
    # Which violation a schema_violation made ("missing_required", "wrong_type", "outside_enum").
    violation: str | None = None


@dataclass(slots=True)
class _Source:
    """What the question offers as values, consumed as the document takes them."""

    question: str
    quoted: list[str]
    proper: list[str]
    numbers: list[str]
    emails: list[str]
    words: list[str]
    rng: random.Random
    prose: Iterator[str]
    defs: Mapping[str, Any] = field(default_factory=dict)
    required_first: bool = False


# How this service states a format in a prompt (``moa.engine.structured.instruction``): a model
# asked so writes the document as for a format its decoding is not held to (errors included).
_ASKED_OBJECT = re.compile(r"Answer with one JSON object and nothing else")
_ASKED_SCHEMA = re.compile(
    r"Answer with one JSON document and nothing else.*?named (?P<name>[\w-]+).*?JSON Schema:\s*"
    r"```json\n(?P<schema>.*?)\n```",
    re.DOTALL,
)


def instructed(transcript: tuple[tuple[str, str], ...]) -> OutputFormat | None:
    """The format a request's system prompt asks for in words, when it was not asked for natively:
    a model follows it as it would a native non-strict format, so a server without structured
    outputs (or an adapter that does not send the format) is simulated too. None: prose."""
    system = "\n".join(text for role, text in transcript if role == "system")
    found = _ASKED_SCHEMA.search(system)
    if found is not None:
        try:
            schema = json.loads(found.group("schema"))
        except ValueError:
            return None
        if isinstance(schema, dict):
            return OutputFormat("json_schema", schema=schema, name=found.group("name"))
    return OutputFormat("json_object") if _ASKED_OBJECT.search(system) else None


def _sentences(
    model: str, style: str, transcript: tuple[tuple[str, str], ...], seed: int | None
) -> Iterator[str]:
    """The model's own answer, a sentence at a time, for prose properties (computed only if asked)."""
    text = compose(model, style, transcript, seed, (60, 120))
    parts = [s.strip() for s in _SENTENCE.split(text) if s.strip()] or [text.strip() or "No answer."]
    while True:
        yield from parts


def document(
    model: str,
    style: str,
    seed: int | None,
    transcript: tuple[tuple[str, str], ...],
    fmt: OutputFormat,
    errors: JsonErrors,
) -> Document:
    """The document ``model`` writes for this conversation and format."""
    schema_key = json.dumps(fmt.schema, sort_keys=True, default=str) if fmt.schema is not None else ""
    rng = random.Random(stable_hash("json", model, seed, transcript, fmt.kind, schema_key))
    # Every error's draw is made, fired or not, so one rate changing leaves the others' draws alone.
    fired = [kind for kind in ERROR_KINDS if rng.random() < getattr(errors, kind)]
    if fmt.strict:
        fired = [k for k in fired if k == "refusal"]
    if fmt.schema is None:
        fired = [k for k in fired if k != "schema_violation"]
    fault = fired[0] if fired else None
    if fault == "refusal":
        return Document(REFUSAL, refused=True, fault=fault)
    question = next((t for r, t in reversed(transcript) if r == "user"), "")
    source = _Source(
        question=question,
        quoted=[a or b for a, b in QUOTED.findall(question)],
        proper=[m.group() for m in PROPER.finditer(question)],
        numbers=NUMBER.findall(question),
        emails=_EMAIL.findall(question),
        words=keywords(question, 8) or ["answer"],
        rng=rng,
        prose=_sentences(model, style, transcript, seed),
        defs=_definitions(fmt.schema),
        required_first=fmt.required_first,
    )
    if fmt.schema is None:
        value: Any = {"answer": next(source.prose), "topic": source.words[0], "keywords": source.words[:3]}
    else:
        value = _value(fmt.schema, source, 0, "")
    violation = None
    if fault == "schema_violation":
        value, violation = _violate(value, fmt.schema or {}, rng)
        if violation is None:
            fault = None  # nothing in this document a violation could break
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if fault == "malformed_json":
        # A trailing comma before the closing bracket: not JSON, and not the start of any JSON
        # either (a cut-short document would still parse as partial JSON in a stream reader).
        text = text[:-1] + "," + text[-1] if text[-1:] in "}]" and len(text) > 2 else text + ","
    return Document(text, fault=fault, violation=violation)


# -- building the document ---------------------------------------------------------------------------


def _definitions(schema: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    for key in ("definitions", "$defs"):
        defs = schema.get(key)
        if isinstance(defs, Mapping):
            out.update({f"#/{key}/{name}": sub for name, sub in defs.items()})
    out["#"] = schema
    return out


def _resolve(schema: Mapping[str, Any], source: _Source) -> Mapping[str, Any]:
    """``schema`` with its ``$ref`` followed (siblings of the reference kept) and ``allOf`` merged."""
    for _ in range(MAX_DEPTH):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or ref not in source.defs:
            break
        schema = {**source.defs[ref], **{k: v for k, v in schema.items() if k != "$ref"}}
    parts = schema.get("allOf")
    if isinstance(parts, list) and parts:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in parts:
            if isinstance(part, Mapping):
                part = _resolve(part, source)
                props = {**(merged.get("properties") or {}), **(part.get("properties") or {})}
                required = [*(merged.get("required") or []), *(part.get("required") or [])]
                merged = {**part, **merged, "properties": props, "required": required}
        schema = merged
    return schema


def _branch(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("anyOf", "oneOf", "any_of"):
        options = schema.get(key)
        if isinstance(options, list) and options and all(isinstance(o, Mapping) for o in options):
            chosen = next((o for o in options if schema_type(o) not in ("null",)), options[0])
            rest = {k: v for k, v in schema.items() if k not in (key,)}
            return {**rest, **chosen}
    return schema


def _value(schema: Mapping[str, Any], source: _Source, depth: int, name: str) -> Any:
    schema = _branch(_resolve(schema, source))
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        said = [v for v in enum if isinstance(v, str) and mentions(source.question, v) >= 0]
        return said[0] if said else source.rng.choice(enum)
    kind = schema_type(schema)
    if depth >= MAX_DEPTH:
        return {"object": {}, "array": [], "integer": 0, "number": 0, "boolean": False}.get(kind or "", "")
    if kind == "object":
        return _object(schema, source, depth)
    if kind == "array":
        return _array(schema, source, depth, name)
    if kind in ("integer", "number"):
        return _number(schema, source, kind)
    if kind == "boolean":
        named = [w for w in _WORDS.findall(name.lower()) if len(w) > 2]
        return any(mentions(source.question, w) >= 0 for w in named) or source.rng.random() < 0.3
    if kind == "null":
        return None
    return _string(schema, source, name)


def _object(schema: Mapping[str, Any], source: _Source, depth: int) -> dict[str, Any]:
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    order = [k for k in schema.get("propertyOrdering") or () if k in props]
    order += [k for k in props if k not in order]
    if source.required_first:
        required = set(schema.get("required") or ())
        order = [k for k in order if k in required] + [k for k in order if k not in required]
    return {
        key: _value(props[key], source, depth + 1, key) if isinstance(props[key], Mapping) else None
        for key in order
    }


def _array(schema: Mapping[str, Any], source: _Source, depth: int, name: str) -> list[Any]:
    low, high = schema.get("minItems"), schema.get("maxItems")
    low = int(low) if isinstance(low, int | str) and str(low).isdigit() else 0
    high = int(high) if isinstance(high, int | str) and str(high).isdigit() else None
    count = max(low, 3 if high is None else min(3, high))
    items = schema.get("items")
    items = items if isinstance(items, Mapping) else {}
    singular = name[:-1] if name.endswith("s") else name
    return [_value(items, source, depth + 1, singular) for _ in range(count)]


def _number(schema: Mapping[str, Any], source: _Source, kind: str) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    lo = float(low) if isinstance(low, int | float) else None
    hi = float(high) if isinstance(high, int | float) else None
    if "exclusiveMinimum" in schema and lo is not None:
        lo += 1 if kind == "integer" else 0.01
    if "exclusiveMaximum" in schema and hi is not None:
        hi -= 1 if kind == "integer" else 0.01
    if source.numbers:
        n = float(source.numbers.pop(0))
    else:
        a = lo if lo is not None else (hi - 9 if hi is not None else 1.0)
        b = hi if hi is not None else a + 9
        n = source.rng.uniform(a, b)
    if lo is not None:
        n = max(n, lo)
    if hi is not None:
        n = min(n, hi)
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and step > 0:
        n = round(n / step) * step
    return round(n) if kind == "integer" else round(n, 2)


def _string(schema: Mapping[str, Any], source: _Source, name: str) -> str:
    rng = source.rng
    fmt = schema.get("format")
    lower = name.lower()
    if fmt == "date":
        return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "date-time":
        return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.choice((0, 15, 30, 45)):02d}:00"
    if fmt == "duration":
        return f"PT{rng.randint(1, 48)}H"
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if fmt == "ipv4":
        return f"192.0.2.{rng.randint(1, 254)}"
    if fmt == "ipv6":
        return f"2001:db8::{rng.randint(1, 0xFFFF):x}"
    if fmt in ("hostname", "uri", "url"):
        host = f"{source.words[0].lower()}.example.com"
        return host if fmt == "hostname" else f"https://{host}/"
    if fmt == "email" or "email" in lower:
        return source.emails.pop(0) if source.emails else f"{source.words[0].lower()}@example.com"
    if lower in _PROSE or any(part in _PROSE for part in lower.split("_")[-1:]):
        text = next(source.prose)
    elif source.quoted:
        text = source.quoted.pop(0)
    elif source.proper:
        text = source.proper.pop(0)
    else:
        text = source.words[rng.randrange(len(source.words))]
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    if isinstance(low, int) and len(text) < low:
        text = (text + " " + source.words[0]) * (low // max(len(text), 1) + 1)
        text = text[: max(low, len(text) if not isinstance(high, int) else min(len(text), high))]
    return text


# -- breaking it on purpose ----------------------------------------------------------------------------


def _violate(value: Any, schema: Mapping[str, Any], rng: random.Random) -> tuple[Any, str | None]:
    """``value`` with one schema violation: a required field left out, a value of the wrong JSON
    type, or a string outside its enum, whichever the document allows (drawn by ``rng``); the
    violation's name, or None when the document offers nothing to break."""
    defs = _definitions(schema)
    source = _Source("", [], [], [], [], ["x"], rng, iter(()), defs)
    target, sub = value, _branch(_resolve(schema, source))
    if isinstance(target, list) and target and isinstance(target[0], dict):
        target, sub = target[0], _branch(_resolve(sub.get("items") or {}, source))
    if not isinstance(target, dict) or not target:
        return value, None
    props = sub.get("properties") or {}
    required = [k for k in sub.get("required") or () if k in target]
    enums = [
        k
        for k, s in props.items()
        if k in target
        and isinstance(s, Mapping)
        and isinstance(_branch(_resolve(s, source)).get("enum"), list)
        and isinstance(target[k], str)
    ]
    options = (
        ["wrong_type"] + (["missing_required"] if required else []) + (["outside_enum"] if enums else [])
    )
    kind = rng.choice(options)
    if kind == "missing_required":
        del target[rng.choice(required)]
    elif kind == "outside_enum":
        key = rng.choice(enums)
        allowed = _branch(_resolve(props[key], source))["enum"]
        target[key] = next(v for v in (f"{target[key]}_other", "other", "unknown") if v not in allowed)
    else:
        key = rng.choice(sorted(target))
        target[key] = mistyped(target[key])
    return value, kind
