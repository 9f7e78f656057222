"""Structured outputs as OpenAI's chat completions take them (``response_format``), and what the
adapters share of asking for a JSON document: a schema format must carry its schema.

OpenAI's own API holds a ``strict`` schema to Structured Outputs' subset (its guide's "Supported
schemas"): every object closed (``additionalProperties: false``) with every property required,
the root an object, and no keyword or string format outside the subset. What can be fitted
without letting through a document the schema refuses is fitted (an object closed, its optional
properties made required: both only narrow what is valid, so every document the API lets the
model write still passes the engine's validation against the schema as asked); what cannot (a
root that is no object, an unsupported keyword or format) is refused before sending, as the API
would refuse it, naming the place in the schema: never dropped in silence, never billed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa.providers.transport import refused_unsent
from moa.types import ResponseFormat

# The name OpenAI requires of a json_schema format, when the request gives none.
DEFAULT_NAME = "response"
# Keywords a strict schema may not use (the Structured Outputs guide's unsupported keywords) and
# the string formats it may, as the API checks them.
NOT_PERMITTED = (
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
    "unevaluatedProperties", "propertyNames", "minProperties", "maxProperties", "unevaluatedItems",
    "contains", "minContains", "maxContains", "uniqueItems", "minLength", "maxLength", "default",
)  # fmt: skip
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})


def schema_of(fmt: ResponseFormat) -> dict[str, Any]:
    """The schema of a ``json_schema`` format (refused when it has none)."""
    if fmt.json_schema is None:
        raise refused_unsent("response_format: a json_schema format without its schema")
    return fmt.json_schema


def openai_response_format(fmt: ResponseFormat, *, strict_subset: bool) -> dict[str, Any]:
    """``response_format`` as OpenAI documents it: ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; with
    ``strict_subset`` (OpenAI's own API), a strict schema fitted to Structured Outputs' subset."""
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = schema_of(fmt)
    name = fmt.name or DEFAULT_NAME
    if fmt.strict and strict_subset:
        schema = strict_schema(name, schema)
    spec: dict[str, Any] = {"name": name, "schema": schema}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


def strict_schema(name: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` as OpenAI's strict mode takes it (a copy), or a refusal naming what it cannot."""
    if schema.get("type") != "object":
        raise refused_unsent(
            f'response_format {name!r}: a strict schema\'s root must be of type "object" for the OpenAI '
            f"API, not {schema.get('type')!r}"
        )
    return _strict(name, schema, "#")


def _strict(name: str, schema: Mapping[str, Any], at: str) -> dict[str, Any]:
    for key in NOT_PERMITTED:
        if key in schema:
            raise refused_unsent(
                f"response_format {name!r}: {key!r} at {at} is not permitted in a strict schema by the "
                "OpenAI API (send strict: false to have the answer validated against it instead)"
            )
    fmt = schema.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise refused_unsent(
            f"response_format {name!r}: format {fmt!r} at {at} is not one a strict schema takes"
        )
    out = dict(schema)
    props = schema.get("properties")
    if schema.get("type") == "object" or isinstance(props, Mapping):
        props = props if isinstance(props, Mapping) else {}
        out["properties"] = {
            k: _strict(name, v, f"{at}/properties/{k}") if isinstance(v, Mapping) else v
            for k, v in props.items()
        }
        # Narrowing only: a closed object with every property present is still valid as asked.
        out["additionalProperties"] = False
        out["required"] = list(props)
    if isinstance(schema.get("items"), Mapping):
        out["items"] = _strict(name, schema["items"], f"{at}/items")
    if isinstance(schema.get("anyOf"), list):
        out["anyOf"] = [
            _strict(name, s, f"{at}/anyOf/{i}") if isinstance(s, Mapping) else s
            for i, s in enumerate(schema["anyOf"])
        ]
    for key in ("$defs", "definitions"):
        defs = schema.get(key)
        if isinstance(defs, Mapping):
            out[key] = {
                k: _strict(name, v, f"{at}/{key}/{k}") if isinstance(v, Mapping) else v
                for k, v in defs.items()
            }
    return out
