"""What the ensemble does with tool calls: canonical forms, the vote, validation, references.

Proposers see the conversation and the tools and propose either calls or a text answer. In ``vote``
mode, when a quorum of the proposals make the same calls (same functions, same arguments as
normalised JSON, in any order), those calls are the answer and no aggregator is asked; otherwise
(and always in ``aggregate`` mode) the aggregator decides, reading each proposal's calls and text
as references, under the same tools and choice.

Whatever answers, its calls are validated here before a client sees them: every call names a
declared function, its arguments parse as a JSON object its schema accepts (``jsonschema``, the
draft the schema declares), their number fits ``parallel_tool_calls``, and the answer fits the
tool choice (no call under ``none``; a call under ``required``; only the named function under a
named choice). An answer that breaks any of these is not given to the client: the next model of
the chain is asked, with the violations in its prompt.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
from jsonschema.exceptions import SchemaError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from moa.result import VoteOutcome
from moa.types import CallResult, ToolCall, ToolSet

ToolMode = Literal["vote", "aggregate"]

# Canonical calls: (function name, arguments as sorted, compact JSON) pairs, sorted.
Canonical = tuple[tuple[str, str], ...]

# The most violations an aggregator's prompt lists, and the characters each may take.
MAX_VIOLATIONS = 5
MAX_VIOLATION_CHARS = 300


def canonical(calls: Sequence[ToolCall]) -> Canonical | None:
    """The calls' canonical form, or None when any call's arguments are not JSON (malformed
    arguments never agree with anything). Order-free: parallel calls in another order are the
    same answer."""
    out = []
    for call in calls:
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError:
            return None
        out.append((call.name, json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)))
    return tuple(sorted(out))


@dataclass
class Vote:
    """The vote's outcome, and the proposal whose calls won (None: the aggregator decides)."""

    outcome: VoteOutcome
    winner: CallResult | None = None


def vote(answered: Sequence[CallResult], needed: int) -> Vote:
    """The calls at least ``needed`` of the ``answered`` proposals agree on (canonically), if any.
    Text answers and malformed calls do not vote for any calls."""
    forms = [(res, canonical(res.tool_calls)) for res in answered if res.ok and res.tool_calls]
    polled, top = poll(forms, len(answered), needed, "made well-formed calls", "agree on their calls")
    if top is not None:
        polled.outcome.calls = [f"{name}({args})" for name, args in top]
    return polled


def poll(
    forms: Sequence[tuple[CallResult, Any]], proposals: int, needed: int, voting: str, agreeing: str
) -> tuple[Vote, Any]:
    """The vote over ``forms`` (each proposal with its canonical answer, None: it votes for
    nothing), out of ``proposals``: the winner and its form when at least ``needed`` agree.
    ``voting`` and ``agreeing`` say, in the reasons, what a proposal that votes does and what
    agreeing means (for tool calls, for documents)."""
    counts = Counter(form for _, form in forms if form is not None)
    outcome = VoteOutcome(proposals=proposals, needed=needed)
    if not counts:
        outcome.reason = f"no proposal {voting}"
        return Vote(outcome), None
    top, agreed = counts.most_common(1)[0]
    outcome.agreed = agreed
    if agreed < needed:
        outcome.reason = f"{agreed} of {proposals} proposals {agreeing}; {needed} needed"
        return Vote(outcome), None
    outcome.decided = True
    return Vote(outcome, next(res for res, form in forms if form == top)), top


@dataclass
class Check:
    """An answer's violations of the request's tool contract (empty: valid)."""

    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def check(res: CallResult, tools: ToolSet) -> Check:
    """Whether ``res`` (an answer's text and calls) keeps the request's tool contract."""
    found: list[str] = []
    calls, choice = res.tool_calls, tools.choice
    if choice.mode == "none" and calls:
        found.append(f"tool_choice is none, but the answer calls {calls[0].name}")
    if choice.mode in ("required", "function") and not calls:
        wanted = f"a call to {choice.name}" if choice.mode == "function" else "at least one tool call"
        found.append(f"tool_choice requires {wanted}, but the answer is text")
    if not tools.parallel and len(calls) > 1:
        found.append(f"parallel_tool_calls is false, but the answer makes {len(calls)} calls")
    for call in calls:
        if choice.mode == "function" and call.name != choice.name:
            found.append(f"tool_choice names {choice.name}, but the answer calls {call.name}")
            continue
        found.extend(_call_violations(call, tools))
    return Check(found)


def _call_violations(call: ToolCall, tools: ToolSet) -> list[str]:
    spec = tools.spec(call.name)
    if spec is None:
        declared = ", ".join(t.name for t in tools.tools)
        return [f"{call.name} is not a declared function (declared: {declared})"]
    try:
        args: Any = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as e:
        return [f"{call.name}: arguments are not valid JSON ({e.msg} at character {e.pos})"]
    if not isinstance(args, dict):
        return [f"{call.name}: arguments must be a JSON object, not {type(args).__name__}"]
    try:
        validator_cls = jsonschema.validators.validator_for(spec.parameters)
        validator = validator_cls(spec.parameters)
        errors = sorted(validator.iter_errors(args), key=lambda e: list(e.absolute_path))
    except (SchemaError, Unresolvable) as e:  # refused at the API already; never passes either
        return [f"{call.name}: its declared schema is invalid ({e})"[:MAX_VIOLATION_CHARS]]
    return [f"{call.name}: {_where(e)}{e.message}"[:MAX_VIOLATION_CHARS] for e in errors]


def _where(error: jsonschema.ValidationError) -> str:
    path = json_path(error)
    return f"arguments{path}: " if path else ""


def json_path(error: jsonschema.ValidationError) -> str:
    """Where in the document ``error`` is, as ``.key[0].key`` (empty: at its root)."""
    return "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def schema_problem(parameters: dict[str, Any]) -> str | None:
    """Why a declared schema (a function's parameters, a response format's) is not a valid JSON
    Schema (None: it is): its keywords, and its ``$ref``s, each of which must point into the schema
    itself (nothing is ever fetched: a remote reference cannot be resolved). A schema with a
    nested ``$id`` (a base its relative references resolve against) has its keywords checked only."""
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except SchemaError as e:
        return e.message
    refs, scoped = _references(parameters)
    if scoped:
        return None
    root = Resource.from_contents(parameters, default_specification=DRAFT202012)
    resolver = Registry().resolver_with_root(root)
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            return f"$ref {ref!r} cannot be resolved within the schema"
    return None


def _references(node: Any, depth: int = 0) -> tuple[list[str], bool]:
    """The ``$ref`` values in a schema, and whether any subschema sets its own ``$id``."""
    refs: list[str] = []
    scoped = False
    if isinstance(node, dict):
        if depth and "$id" in node:
            scoped = True
        if isinstance(node.get("$ref"), str):
            refs.append(node["$ref"])
        children = [v for k, v in node.items() if k not in ("const", "enum", "default", "examples")]
    elif isinstance(node, list):
        children = node
    else:
        return refs, scoped
    for child in children:
        found, nested = _references(child, depth + 1)
        refs += found
        scoped = scoped or nested
    return refs, scoped


def correction(violations: Sequence[str]) -> str:
    """What the next model of a chain is told of the answer the model before it gave."""
    listed = "\n".join(f"- {v}" for v in violations[:MAX_VIOLATIONS])
    return (
        "A previous answer to this request was rejected because its tool calls broke the tools' "
        f"contract:\n{listed}\nAnswer again, calling only the declared functions with arguments "
        "their JSON Schemas accept, as the tool choice allows."
    )


def reference_text(res: CallResult) -> str:
    """A proposal as an aggregator reads it: its text, and the calls it proposes."""
    if not res.tool_calls:
        return res.text
    calls = "\n".join(f"- {c.name}({c.arguments})" for c in res.tool_calls)
    proposed = f"Proposed tool calls:\n{calls}"
    return f"{res.text}\n\n{proposed}" if res.text.strip() else proposed
