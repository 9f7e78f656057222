"""What the ensemble does with a requested answer format (``response_format``): the instruction a
model reads, the document parsed out of its answer, validation against the schema, and the vote.

The format is asked of every model that writes the final answer (the aggregators, a single
model, the fallbacks) natively (``CallRequest.response_format``) and in its prompt (``instruction``:
OpenAI's JSON mode refuses messages that never mention JSON, and a compatible server without
structured outputs still reads it). Proposers answer freely unless the plan says
``structured: proposers``; then they are asked for the format too, and a quorum of them writing
the same document (canonical JSON) is the answer, with no aggregator call, as for tool calls.

Whoever answers, the document is validated here before a client sees it: it parses as JSON (a
single ```json fence around it is tolerated and removed), ``json_object`` asks for an object, and
a schema accepts it (``jsonschema``, the draft the schema declares). An answer that fails goes to
the next model of the chain with the violations in its prompt (``moa.engine.contract``). A model's
refusal (``CallResult.refusal``) is an answer, not a violation: it is returned as OpenAI returns
one (``message.refusal``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from moa.engine.toolcalls import MAX_VIOLATION_CHARS, Check, Vote, json_path, poll
from moa.errors import DOCUMENT_REJECTED
from moa.types import CallResult, ResponseFormat

# What a rejected document's failure (and the next model's prompt) says: also how a failure is
# known to be the format's (``moa.errors.AllProvidersFailed`` names it ``invalid_structured_output``).
REJECTED = DOCUMENT_REJECTED

# One fenced block and nothing else around it: ```json ... ``` (or a bare ```).
_FENCE = re.compile(r"\A\s*```(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?```\s*\Z", re.DOTALL)


def instruction(fmt: ResponseFormat) -> str:
    """The format, stated in the prompt of every model asked for it."""
    if fmt.type == "json_object":
        return "Answer with one JSON object and nothing else: no prose around it, no code fence."
    about = f" ({fmt.description})" if fmt.description else ""
    schema = json.dumps(fmt.json_schema, ensure_ascii=False)
    return (
        f"Answer with one JSON document and nothing else: no prose around it, no code fence. It is "
        f"named {fmt.name}{about} and must conform to this JSON Schema:\n```json\n{schema}\n```"
    )


def document(text: str) -> tuple[str, Any] | None:
    """The JSON document an answer is, as (its text, its value): the whole answer, or the body of a
    single ```json fence making up the whole answer. None when it does not parse."""
    match = _FENCE.match(text)
    body = match.group("body") if match else text
    try:
        return body.strip(), json.loads(body)
    except ValueError:
        return None


def violations(text: str, fmt: ResponseFormat) -> list[str]:
    """Why ``text`` is not a document ``fmt`` accepts (empty: it is)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"the answer is not valid JSON ({e.msg} at character {e.pos})"]
    if fmt.type == "json_object" or fmt.json_schema is None:
        if not isinstance(value, dict):
            return [f"the answer must be a JSON object, not {type(value).__name__}"]
        return []
    try:
        validator = jsonschema.validators.validator_for(fmt.json_schema)(fmt.json_schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    except (SchemaError, Unresolvable) as e:  # refused at the API already; never passes either
        return [f"the schema {fmt.name} is invalid ({e})"[:MAX_VIOLATION_CHARS]]
    return [f"${json_path(e)}: {e.message}"[:MAX_VIOLATION_CHARS] for e in errors]


def checked(res: CallResult, fmt: ResponseFormat) -> tuple[CallResult, Check]:
    """``res`` with its text made the bare document (a fence removed), and its violations of
    ``fmt``. An answer of tool calls, or a refusal, is not held to the format."""
    if res.tool_calls or res.refusal is not None:
        return res, Check()
    found = document(res.text)
    if found is None:
        return res, Check(violations(res.text, fmt))
    text, _ = found
    return res.model_copy(update={"text": text}), Check(violations(text, fmt))


def canonical(res: CallResult) -> str | None:
    """The document an answer is, as sorted compact JSON, numbers as numbers (18 and 18.0 agree);
    None: not a document, which agrees with nothing."""
    if res.tool_calls or res.refusal is not None:
        return None
    found = document(res.text)
    if found is None:
        return None
    return json.dumps(_normal(found[1]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _normal(value: Any) -> Any:
    """``value`` with every integral number an int: 18 and 18.0 are one JSON number."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def vote(answered: Sequence[CallResult], needed: int) -> Vote:
    """The document at least ``needed`` of the ``answered`` proposals wrote (canonically), if any;
    its canonical JSON in the outcome's ``calls``."""
    forms = [(res, canonical(res)) for res in answered if res.ok]
    polled, top = poll(forms, len(answered), needed, "wrote a JSON document", "wrote the same document")
    if top is not None:
        polled.outcome.calls = [top]
    return polled
