"""Tool calling, whatever the wire: the tools a request offers, and the calls a simulated model makes.

Each protocol module parses its own tool declarations and tool turns into a ``ToolUse`` and renders
``ToolCall``s its own way; this module decides what the model does with them, deterministically
(the same model, conversation, tools and seed always give the same calls), so a benchmark of
voting and validation can be repeated:

- the tools a call may use follow the request's tool choice (none, auto, required, one named
  function, Gemini's allowed names); a text answer when the choice is none, and under auto once the
  conversation ends with a tool result (the model answers from it);
- the function called is the one the last user message names (``get_weather`` or "get weather"),
  else the one whose name and description share most words with it; several named functions, or
  several quoted values for one function's string argument, give several calls when parallel
  calls are allowed;
- arguments are built from the JSON Schema: every required property, optional ones only when the
  message offers a value (one of their enum values, or a proper noun not used yet); strings from
  the message's quoted values or its proper nouns, in order, numbers from its numbers, enums from
  the values it mentions;
- a model's ``ToolErrors`` (its profile) inject the faults that voting and validation exist to
  catch, each at its own rate: a wrong function, a missing or mistyped argument, malformed JSON, or
  a text answer where a call was required. A strict tool's arguments are never wrong: strict
  decoding holds them to the schema (a wrong function or a text answer can still happen).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moa.simulator.profile import ToolErrors
from moa.simulator.text import keywords, stable_hash
from moa.tokens import approx_tokens

Mode = Literal["auto", "none", "required"]
# The kinds of error a model makes when it calls tools, in the order their draws are made.
ERROR_KINDS: tuple[str, ...] = tuple(ToolErrors.model_fields)


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON Schema (Gemini's OpenAPI subset included)
    # Strict mode (OpenAI's and Anthropic's structured outputs): decoding is held to the schema,
    # so the model's arguments always match it, whatever its error rates say.
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What a request says about tools: the declarations, what the model may call, and how many."""

    tools: tuple[Tool, ...]
    mode: Mode = "auto"
    # The functions a call may name (one for a named choice, Gemini's allowedFunctionNames); empty: any.
    allowed: tuple[str, ...] = ()
    parallel: bool = True
    # Whether the model says what it is about to do before its calls: Claude does under auto (under
    # any and tool the API prefills the call, so it writes no text first).
    preamble: bool = False
    # OpenAI's legacy functions/function_call: one call at most, answered as message.function_call.
    legacy_functions: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    # The arguments as the model wrote them: JSON text, or (malformed_json) text that does not parse.
    arguments: str

    @property
    def args(self) -> dict[str, Any] | None:
        """The arguments as an object, or None when the model wrote malformed JSON."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Proposal:
    """What the model does: these calls, or (no calls) a text answer; ``fault`` names the
    injected error, if one fired."""

    calls: tuple[ToolCall, ...] = ()
    fault: str | None = None


def tool_result_text(name: str, content: Any) -> str:
    """A tool turn as the transcript keeps it (what token counts and the answer see)."""
    body = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)
    return f"[{name or 'tool'} result] {body}"


def tool_call_text(name: str, arguments: str) -> str:
    """An earlier call as the transcript keeps it."""
    return f"[call {name}] {arguments}"


def declared_tokens(use: ToolUse | None) -> int:
    """The declarations' size in prompt tokens: the APIs put them in the prompt and bill them."""
    if use is None:
        return 0
    decls = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in use.tools]
    return approx_tokens(json.dumps(decls, separators=(",", ":"), ensure_ascii=False))


def dumps_args(args: Mapping[str, Any]) -> str:
    """Arguments as the models write them: compact JSON, keys in schema order."""
    return json.dumps(args, separators=(",", ":"), ensure_ascii=False)


# -- choosing the calls ------------------------------------------------------------------------------

QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
PROPER = re.compile(r"(?<=[a-z,;:] )[A-Z][\w'-]*(?: [A-Z][\w'-]*)*")
_WORDS = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def mentions(question: str, name: str) -> int:
    """Where ``question`` names the function (as written, or with spaces for _ and -), or -1."""
    lower = question.lower()
    for form in (name.lower(), re.sub(r"[_\-.]+", " ", name).lower()):
        m = re.search(r"(?<![\w])" + re.escape(form) + r"(?![\w])", lower)
        if m:
            return m.start()
    return -1


def _targets(question: str, tools: Sequence[Tool], rng: random.Random) -> list[Tool]:
    named = sorted((pos, i) for i, t in enumerate(tools) if (pos := mentions(question, t.name)) >= 0)
    if named:
        return [tools[i] for _, i in named]
    asked = _words(question)
    scores = [len(asked & _words(f"{t.name.replace('_', ' ')} {t.description}")) for t in tools]
    best = max(scores)
    return [rng.choice([t for t, s in zip(tools, scores, strict=True) if s == best])]


@dataclass(slots=True)
class _Prompt:
    """What argument values the message offers, consumed as calls take them."""

    text: str
    quoted: list[str]
    numbers: list[str]
    proper: list[str]
    rng: random.Random


def schema_type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if str(x).lower() != "null"), None)
    if isinstance(t, str):
        return t.lower()
    if "properties" in schema:
        return "object"
    return None


def first_branch(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("anyOf", "oneOf", "any_of"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            return next((o for o in options if schema_type(o) not in (None, "null")), options[0])
    return schema


def value_for(schema: Mapping[str, Any], prompt: _Prompt, depth: int = 0) -> Any:
    """A value ``schema`` accepts, taken from the message where it offers one."""
    schema = first_branch(schema)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        said = [v for v in enum if isinstance(v, str) and mentions(prompt.text, v) >= 0]
        return said[0] if said else prompt.rng.choice(enum)
    kind = schema_type(schema)
    if kind == "object":
        return _object(schema, prompt, depth + 1) if depth < 6 else {}
    if kind == "array":
        items = schema.get("items")
        low = schema.get("minItems", 1)
        count = max(1, low if isinstance(low, int) else 1)
        return [
            value_for(items if isinstance(items, Mapping) else {}, prompt, depth + 1) for _ in range(count)
        ]
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", 1), schema.get("maximum", 10)
        if prompt.numbers:
            n = float(prompt.numbers.pop(0))
        else:
            n = (
                prompt.rng.uniform(float(low), float(high))
                if kind == "number"
                else prompt.rng.randint(int(low), int(high))
            )
        return int(n) if kind == "integer" else round(float(n), 2)
    if kind == "boolean":
        return prompt.rng.random() < 0.5
    if kind == "null":
        return None
    return _string(schema, prompt)


def _string(schema: Mapping[str, Any], prompt: _Prompt) -> str:
    fmt = schema.get("format")
    if fmt == "date":
        return f"2025-{prompt.rng.randint(1, 12):02d}-{prompt.rng.randint(1, 28):02d}"
    if fmt == "date-time":
        return f"2025-{prompt.rng.randint(1, 12):02d}-{prompt.rng.randint(1, 28):02d}T12:00:00Z"
    if prompt.quoted:
        return prompt.quoted.pop(0)
    if prompt.proper:
        return prompt.proper.pop(0)
    words = keywords(prompt.text, 3)
    return words[0] if words else "example"


def _object(schema: Mapping[str, Any], prompt: _Prompt, depth: int = 0) -> dict[str, Any]:
    """An object for ``schema``: its required properties first (they take the message's values
    first), then the optional ones the message offers a value for; keys in the schema's order."""
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = [r for r in schema.get("required") or () if isinstance(r, str)]
    values: dict[str, Any] = {}
    for name in required:
        sub = props.get(name)
        values[name] = value_for(sub, prompt, depth) if isinstance(sub, Mapping) else _string({}, prompt)
    for name, sub in props.items():
        if name in values or not isinstance(sub, Mapping):
            continue
        enum = first_branch(sub).get("enum")
        said = isinstance(enum, list) and any(
            isinstance(v, str) and mentions(prompt.text, v) >= 0 for v in enum
        )
        # An optional free-text property the message still offers a name for ("show Barbie").
        said = said or (enum is None and schema_type(first_branch(sub)) == "string" and bool(prompt.proper))
        if said:
            values[name] = value_for(sub, prompt, depth)
    order = [*props, *required]
    return {k: values[k] for k in sorted(values, key=order.index)}


def _string_slots(schema: Mapping[str, Any]) -> int:
    """How many quoted values one call of this function takes (its required plain strings)."""
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return 0
    required = schema.get("required") or ()
    return sum(
        1
        for n in required
        if isinstance(props.get(n), Mapping) and schema_type(props[n]) == "string" and "enum" not in props[n]
    )


def propose(
    model: str,
    seed: int | None,
    transcript: tuple[tuple[str, str], ...],
    use: ToolUse,
    errors: ToolErrors,
    new_id: Callable[[], str],
) -> Proposal:
    """The calls ``model`` makes for this conversation (none: it answers in text)."""
    rng = random.Random(stable_hash("tools", model, seed, transcript, use))
    # Every error's draw is made, fired or not, so one rate changing leaves the others' draws alone.
    fired = [kind for kind in ERROR_KINDS if rng.random() < getattr(errors, kind)]
    fault = fired[0] if fired else None
    after_result = bool(transcript) and transcript[-1][0] == "tool"
    if use.mode == "none" or not use.tools or (after_result and use.mode == "auto"):
        return Proposal()
    if fault == "text_instead_of_call":
        return Proposal(fault=fault)
    allowed = [t for t in use.tools if not use.allowed or t.name in use.allowed] or list(use.tools)
    question = next((t for r, t in reversed(transcript) if r == "user"), "")
    prompt = _Prompt(
        text=question,
        quoted=[a or b for a, b in QUOTED.findall(question)],
        numbers=NUMBER.findall(question),
        proper=[],
        rng=rng,
    )
    nouns = [(m.start(), m.group()) for m in PROPER.finditer(question)]
    targets = _targets(question, allowed, rng)
    calls: list[tuple[Tool, dict[str, Any]]] = []
    for tool in targets:
        # The names a function's arguments take are those said after it is, first.
        at = mentions(question, tool.name)
        left = [(pos, noun) for pos, noun in nouns if noun in prompt.proper or not calls]
        prompt.proper = [noun for _, noun in sorted(left, key=lambda pn: (pn[0] < at, pn[0]))]
        calls.append((tool, _object(tool.parameters, prompt)))
        # The same function again while the message still quotes values for it.
        slots = _string_slots(tool.parameters)
        while use.parallel and len(targets) == 1 and slots and len(prompt.quoted) >= slots:
            calls.append((tool, _object(tool.parameters, prompt)))
    if not use.parallel:
        calls = calls[:1]
    first_tool, first_args = calls[0]
    arguments = dumps_args(first_args)
    name = first_tool.name
    if first_tool.strict and fault in ("missing_argument", "mistyped_argument", "malformed_json"):
        fault = None  # strict decoding cannot write arguments its schema refuses
    if fault == "wrong_function":
        others = [t for t in use.tools if t.name != name]
        if others:
            wrong = rng.choice(others)
            name, arguments = wrong.name, dumps_args(_object(wrong.parameters, prompt))
        else:  # one function declared: the model calls one it imagined
            name = name + "_v2"
    elif fault == "missing_argument":
        required = [r for r in first_tool.parameters.get("required") or () if r in first_args]
        if required:
            gone = rng.choice(required)
            arguments = dumps_args({k: v for k, v in first_args.items() if k != gone})
    elif fault == "mistyped_argument" and first_args:
        key = rng.choice(sorted(first_args))
        arguments = dumps_args({**first_args, key: mistyped(first_args[key])})
    elif fault == "malformed_json":
        # A trailing comma: not JSON, and not the start of any JSON either (a cut-short object
        # would still parse as partial JSON, which is how stream accumulators read arguments).
        arguments = arguments[:-1] + ",}"
    out = [ToolCall(new_id(), name, arguments)]
    out += [ToolCall(new_id(), t.name, dumps_args(a)) for t, a in calls[1:]]
    return Proposal(calls=tuple(out), fault=fault)


def mistyped(value: Any) -> Any:
    """The same value with the wrong JSON type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 42 if not value.lstrip("-").isdigit() else int(value) + 0.5
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return "null"


def answer_from_results(transcript: tuple[tuple[str, str], ...], text: str) -> str:
    """A text answer after tool results leads with what they said, so a test (and a reader) can
    see the model answered from them."""
    results = []
    for role, t in reversed(transcript):
        if role != "tool":
            break
        results.append(t)
    if not results:
        return text
    said = "; ".join(reversed(results))
    if len(said) > 300:
        said = said[:297] + "..."
    return f"From the tool results ({said}): {text}"


def preamble_text(calls: Sequence[ToolCall]) -> str:
    """What Claude says before its calls when it chooses to make them (its tool_choice auto)."""
    names = list(dict.fromkeys(c.name for c in calls))
    said = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"I'll use {said} to answer that."
