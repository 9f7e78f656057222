"""The OpenAI Chat Completions wire format (``POST /v1/chat/completions``), streaming included."""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from typing import Any

from moa.simulator.images import Image, assumed, b64decode, openai_tokens, parse_data_url, sniff
from moa.simulator.structured import OutputFormat
from moa.simulator.text import stable_hash
from moa.simulator.tools import Mode, Tool, ToolUse, declared_tokens, tool_call_text, tool_result_text
from moa.simulator.wire import (
    BadRequest,
    Completion,
    Err,
    SimRequest,
    Wire,
    argument_pieces,
    dumps,
    is_integer,
    is_number,
    json_type,
    random_id,
    sse,
)
from moa.types import OPENAI_CHAT_FIELDS

_ERRORS: dict[Err, tuple[str, str | None]] = {
    Err.BAD_REQUEST: ("invalid_request_error", None),
    Err.AUTH: ("invalid_request_error", "invalid_api_key"),
    Err.NOT_FOUND: ("invalid_request_error", "unknown_url"),
    Err.RATE_LIMIT: ("requests", "rate_limit_exceeded"),
    Err.SERVER: ("server_error", None),
    Err.UNAVAILABLE: ("server_error", None),
}
# A refusal ends as a plain stop: the refusal itself is in ``message.refusal``.
_FINISH = {
    "stop": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "refusal": "stop",
}
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
MAX_NAME = 64


# Images: the formats the API reads, and its words for what it cannot (as reported verbatim in
# public issue threads; the second message's code is assumed to be the first's).
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_UNSUPPORTED_IMAGE = (
    "You uploaded an unsupported image. Please make sure your image has of one the following formats: "
    "['png', 'jpeg', 'gif', 'webp']."
)
_INVALID_IMAGE = "You uploaded an unsupported image. Please make sure your image is valid."
_NO_VISION = "Invalid content type. image_url is only supported by certain models."
_DETAILS = ("auto", "low", "high")


def _image(part: Mapping[str, Any], where: str, message: int, index: int) -> Image:
    """An ``image_url`` part, checked as the API checks it; a data URL's image is measured, a URL
    (never fetched) assumed. ``where`` is the part's path (``messages[0].content[1]``)."""
    spec = part.get("image_url")
    if spec is None:
        raise _missing(f"{where}.image_url")
    if not isinstance(spec, Mapping):
        raise _invalid_type(f"{where}.image_url", "an object", spec)
    url = spec.get("url")
    if url is None:
        raise _missing(f"{where}.image_url.url")
    if not isinstance(url, str):
        raise _invalid_type(f"{where}.image_url.url", "a string", url)
    detail = spec.get("detail") or "auto"
    if detail not in _DETAILS:
        raise BadRequest(
            f"Invalid value: '{detail}'. Supported values are: 'auto', 'low', and 'high'.",
            f"{where}.image_url.detail",
            "invalid_value",
        )
    data = parse_data_url(url)
    if data is not None:
        media_type, is_base64, payload = data
        if media_type not in _IMAGE_TYPES:
            raise BadRequest(_UNSUPPORTED_IMAGE, None, "invalid_image_format")
        raw = b64decode(payload) if is_base64 else None
        found = sniff(raw) if raw else None
        if found is None:
            raise BadRequest(_INVALID_IMAGE, None, "invalid_image_format")
        image = Image("data", found[0], found[1], found[2], measured=True)
    elif url.startswith(("https://", "http://")):
        image = assumed("url")
    else:  # the simulator's own words: none were found for this
        raise BadRequest(
            f"Invalid '{where}.image_url.url'. Expected a valid URL, but got a value with an invalid format.",
            f"{where}.image_url.url",
            "invalid_value",
        )
    return dataclasses.replace(
        image,
        tokens=openai_tokens(image.width, image.height, detail),
        where=f"messages.[{message}].content.[{index}].type",
        detail=detail,
    )


def _content(content: Any, where: str, message: int) -> tuple[str, list[Image]]:
    """A message's text, and the images among its parts."""
    if content is None or isinstance(content, str):
        return content or "", []
    if isinstance(content, list):
        parts, images = [], []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or "type" not in part:
                raise BadRequest(f"Invalid type for '{where}[{i}]': expected an object with a type.", where)
            if part["type"] == "text":
                parts.append(str(part.get("text", "")))
            elif part["type"] == "image_url":
                images.append(_image(part, f"{where}[{i}]", message, i))
        return "\n".join(parts), images
    raise BadRequest(f"Invalid type for '{where}': expected a string or an array of content parts.", where)


# Every top-level field of a chat completion request the API knows; anything else is refused by name.
_FIELDS = OPENAI_CHAT_FIELDS
MAX_STOP = 4
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
    "if you're accessing the API from your browser and are prompted for a username and password. You "
    "can obtain an API key from https://platform.openai.com/account/api-keys."
)


def mask_key(key: str) -> str:
    """A wrong key as OpenAI's 401 echoes it: its first 8 and last 4 characters with a star for each
    one between ("sk-proj-****...abcd"); a key of 12 characters or fewer comes back whole."""
    return key if len(key) <= 12 else key[:8] + "*" * (len(key) - 12) + key[-4:]


def _invalid_type(name: str, expected: str, v: Any) -> BadRequest:
    got = json_type(v)
    # The API names what it got with an article ("but got a string instead"), null without one.
    got = got if got == "null" else ("an " if got[0] in "aeiou" else "a ") + got
    return BadRequest(
        f"Invalid type for '{name}': expected {expected}, but got {got} instead.",
        name,
        "invalid_type",
    )


def _out_of_range(name: str, kind: str, v: Any, bound: float, above: bool) -> BadRequest:
    where, op, code = ("above maximum", "<=", "max") if above else ("below minimum", ">=", "min")
    return BadRequest(
        f"Invalid '{name}': {kind} {where} value. Expected a value {op} {bound:g}, but got {v} instead.",
        name,
        f"{kind}_{'above' if above else 'below'}_{code}_value",
    )


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not is_number(v):
        raise _invalid_type(name, "a decimal", v)
    if v < lo or v > hi:
        raise _out_of_range(name, "decimal", v, hi if v > hi else lo, above=v > hi)
    return float(v)


def _integer(body: Mapping[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not is_integer(v):
        raise _invalid_type(name, "an integer", v)
    if lo is not None and v < lo:
        raise _out_of_range(name, "integer", v, lo, above=False)
    return int(v)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise BadRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(stop)} instead.",
            "stop",
            "array_above_max_length",
        )
    return tuple(stop)


def _missing(where: str) -> BadRequest:
    return BadRequest(f"Missing required parameter: '{where}'.", where, "missing_required_parameter")


# What a strict response format's schema may not use (the Structured Outputs guide's unsupported
# keywords), and the string formats it may: refused as "'X' is not permitted." and "'X' is not a
# valid format." (the API's words, as reported verbatim in public issue threads).
_NOT_PERMITTED = (
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
    "unevaluatedProperties", "propertyNames", "minProperties", "maxProperties", "unevaluatedItems",
    "contains", "minContains", "maxContains", "uniqueItems", "minLength", "maxLength", "default",
)  # fmt: skip
_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})


def _strict_schema(
    head: str,
    schema: Mapping[str, Any],
    where: str,
    code: str,
    context: tuple[str, ...] = (),
    *,
    keywords: bool = False,
) -> None:
    """What strict mode (Structured Outputs) demands of every object in a schema: no additional
    properties, and every property required; with ``keywords`` (a response format), no
    unsupported keyword or string format either. Refused in OpenAI's words otherwise, each message
    after ``head`` ("Invalid schema for function 'f': ")."""
    at = f"{head}In context={context!r}, "
    if keywords:
        for key in _NOT_PERMITTED:
            if key in schema:
                raise BadRequest(at + f"'{key}' is not permitted.", where, code)
        fmt = schema.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise BadRequest(at + f"'{fmt}' is not a valid format.", where, code)
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            raise BadRequest(
                at + "'additionalProperties' is required to be supplied and to be false.", where, code
            )
        required = schema.get("required") or []
        missing = [k for k in props if k not in required]
        if missing:
            raise BadRequest(
                at + "'required' is required to be supplied and to be an array including every key "
                f"in properties. Missing '{missing[0]}'.",
                where,
                code,
            )
        for key, sub in props.items():
            if isinstance(sub, Mapping):
                _strict_schema(head, sub, where, code, (*context, "properties", key), keywords=keywords)
    items = schema.get("items")
    if isinstance(items, Mapping):
        _strict_schema(head, items, where, code, (*context, "items"), keywords=keywords)
    for key in ("anyOf", "$defs", "definitions") if keywords else ():
        subs = schema.get(key)
        named = (
            enumerate(subs) if isinstance(subs, list) else subs.items() if isinstance(subs, Mapping) else ()
        )
        for name, sub in named:
            if isinstance(sub, Mapping):
                _strict_schema(head, sub, where, code, (*context, key, str(name)), keywords=keywords)


_JSON_WORD = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
)


def _response_format(body: Mapping[str, Any], transcript: list[tuple[str, str]]) -> OutputFormat | None:
    """The request's ``response_format`` (None for text), checked as the API checks it: JSON mode
    only when the messages mention JSON, and a strict schema held to Structured Outputs' subset."""
    spec = body.get("response_format")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise _invalid_type("response_format", "an object", spec)
    kind = spec.get("type")
    if kind is None:
        raise _missing("response_format.type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object', and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in text.lower() for _, text in transcript):
            raise BadRequest(_JSON_WORD, "messages")
        return OutputFormat("json_object")
    where = "response_format.json_schema"
    js = spec.get("json_schema")
    if js is None:
        raise _missing(where)
    if not isinstance(js, Mapping):
        raise _invalid_type(where, "an object", js)
    name = js.get("name")
    if name is None:
        raise _missing(f"{where}.name")
    _check_name(name, f"{where}.name")
    schema = js.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise _invalid_type(f"{where}.schema", "an object", schema)
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid_type(f"{where}.strict", "a boolean", strict)
    if strict:
        schema = schema or {}
        head = f"Invalid schema for response_format '{name}': "
        if schema.get("type") != "object":
            got = schema.get("type")
            raise BadRequest(
                head + f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{got}\"'.",
                "response_format",
                "invalid_json_schema",
            )
        _strict_schema(head, schema, "response_format", "invalid_json_schema", keywords=True)
    return OutputFormat("json_schema", schema, name, strict=bool(strict))


def _check_name(name: Any, where: str) -> None:
    """A function's or a response format's name: a string of at most 64 of a-z, A-Z, 0-9, _ and -."""
    if not isinstance(name, str):
        raise _invalid_type(where, "a string", name)
    if len(name) > MAX_NAME:
        raise BadRequest(
            f"Invalid '{where}': string too long. Expected a string with maximum length {MAX_NAME}, "
            f"but got a string with length {len(name)} instead.",
            where,
            "string_above_max_length",
        )
    if not _NAME.match(name):
        raise BadRequest(
            f"Invalid '{where}': string does not match pattern. Expected a string that matches the "
            "pattern '^[a-zA-Z0-9_-]+$'.",
            where,
            "invalid_value",
        )


def _function(fn: Any, where: str) -> Tool:
    if not isinstance(fn, Mapping):
        raise _invalid_type(where, "an object", fn)
    name = fn.get("name")
    if name is None:
        raise _missing(f"{where}.name")
    _check_name(name, f"{where}.name")
    description = fn.get("description", "")
    if not isinstance(description, str):
        raise _invalid_type(f"{where}.description", "a string", description)
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, Mapping):
        raise _invalid_type(f"{where}.parameters", "an object", params)
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid_type(f"{where}.strict", "a boolean", strict)
    if strict:
        head = f"Invalid schema for function '{name}': "
        _strict_schema(head, params, f"{where}.parameters", "invalid_function_parameters")
    return Tool(name, description, params, strict=bool(strict))


def _choice(choice: Any, names: set[str], legacy: bool) -> tuple[Mode, tuple[str, ...]]:
    """The tool choice (legacy: function_call) as a mode and the functions it allows."""
    field = "function_call" if legacy else "tool_choice"
    if choice is None:
        return "auto", ()
    if isinstance(choice, str):
        modes = ("none", "auto") if legacy else ("none", "auto", "required")
        if choice not in modes:
            listed = ", ".join(f"'{m}'" for m in modes[:-1]) + f", and '{modes[-1]}'"
            if len(modes) == 2:
                listed = f"'{modes[0]}' and '{modes[1]}'"
            raise BadRequest(
                f"Invalid value: '{choice}'. Supported values are: {listed}.", field, "invalid_value"
            )
        return choice, ()  # type: ignore[return-value]
    if not isinstance(choice, Mapping):
        raise _invalid_type(field, "a string or an object", choice)
    if legacy:
        name = choice.get("name")
        where = f"{field}.name"
    elif choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if not isinstance(allowed, Mapping):
            raise _missing(f"{field}.allowed_tools")
        mode = allowed.get("mode")
        if mode not in ("auto", "required"):
            raise BadRequest(
                f"Invalid value: '{mode}'. Supported values are: 'auto' and 'required'.",
                f"{field}.allowed_tools.mode",
                "invalid_value",
            )
        names_listed = [
            t.get("function", {}).get("name") for t in allowed.get("tools") or () if isinstance(t, Mapping)
        ]
        for n in names_listed:
            if n not in names:
                raise BadRequest(
                    f"Invalid value for '{field}': function '{n}' is not among the tools.",
                    field,
                    "invalid_value",
                )
        return mode, tuple(n for n in names_listed if isinstance(n, str))
    else:
        if choice.get("type") != "function":
            raise BadRequest(
                f"Invalid value: '{choice.get('type')}'. Supported values are: 'function', 'allowed_tools' "
                "and 'custom'.",
                f"{field}.type",
                "invalid_value",
            )
        fn = choice.get("function")
        if not isinstance(fn, Mapping):
            raise _missing(f"{field}.function")
        name = fn.get("name")
        where = f"{field}.function.name"
    if not isinstance(name, str):
        raise _missing(where)
    if name not in names:
        raise BadRequest(
            f"Invalid value for '{field}': function '{name}' is not among the "
            f"{'functions' if legacy else 'tools'}.",
            field,
            "invalid_value",
        )
    return "required", (name,)


def _tool_use(body: Mapping[str, Any]) -> ToolUse | None:
    """The request's tools (or legacy functions) and what the model may do with them."""
    tools, functions = body.get("tools"), body.get("functions")
    if tools is not None and functions is not None:
        raise BadRequest("Invalid parameter: 'functions' and 'tools' cannot both be specified.", "functions")
    legacy = functions is not None
    field, decls = ("functions", functions) if legacy else ("tools", tools)
    choice_field = "function_call" if legacy else "tool_choice"
    choice = body.get(choice_field)
    parallel = body.get("parallel_tool_calls")
    if decls is None:
        for name, value in ((choice_field, choice), ("parallel_tool_calls", parallel)):
            if value is not None:
                raise BadRequest(
                    f"Invalid value for '{name}': '{name}' is only allowed when '{field}' are specified.",
                    name,
                )
        return None
    if not isinstance(decls, list):
        raise _invalid_type(field, "an array", decls)
    if not decls:
        raise BadRequest(
            f"Invalid '{field}': empty array. Expected an array with minimum length 1, but got an empty "
            "array instead.",
            field,
            "empty_array",
        )
    declared: list[Tool] = []
    for i, t in enumerate(decls):
        where = f"{field}[{i}]"
        if legacy:
            declared.append(_function(t, where))
            continue
        if not isinstance(t, Mapping):
            raise _invalid_type(where, "an object", t)
        if "type" not in t:
            raise _missing(f"{where}.type")
        if t["type"] != "function":
            raise BadRequest(
                f"Invalid value: '{t['type']}'. Supported values are: 'function' and 'custom'.",
                f"{where}.type",
                "invalid_value",
            )
        if "function" not in t:
            raise _missing(f"{where}.function")
        declared.append(_function(t["function"], f"{where}.function"))
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid_type("parallel_tool_calls", "a boolean", parallel)
    mode, allowed = _choice(choice, {t.name for t in declared}, legacy)
    return ToolUse(
        tools=tuple(declared),
        mode=mode,
        allowed=allowed,
        parallel=not legacy and parallel is not False,
        legacy_functions=legacy,
    )


def _assistant_calls(m: Mapping[str, Any], where: str) -> dict[str, str]:
    """An assistant message's tool calls (legacy: its function_call), by id, checked as the API
    checks them."""
    calls = m.get("tool_calls")
    if calls is None:
        return {}
    if not isinstance(calls, list):
        raise _invalid_type(f"{where}.tool_calls", "an array", calls)
    out = {}
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise _invalid_type(at, "an object", call)
        for key in ("id", "type", "function"):
            if key not in call:
                raise _missing(f"{at}.{key}")
        fn = call["function"]
        if not isinstance(fn, Mapping):
            raise _invalid_type(f"{at}.function", "an object", fn)
        for key in ("name", "arguments"):
            if key not in fn:
                raise _missing(f"{at}.function.{key}")
            if not isinstance(fn[key], str):
                raise _invalid_type(f"{at}.function.{key}", "a string", fn[key])
        if not isinstance(call["id"], str):
            raise _invalid_type(f"{at}.id", "a string", call["id"])
        out[call["id"]] = fn["name"]
    return out


def _unanswered(pending: Mapping[str, str], index: int) -> BadRequest:
    return BadRequest(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        "'tool_call_id'. The following tool_call_ids did not have response messages: " + ", ".join(pending),
        f"messages.[{index}].role",
    )


# The limits a simulated 429 reports: nominal, since the simulator enforces none of its own.
NOMINAL_RPM, NOMINAL_TPM = 500, 30000


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it, Go's ``time.Duration`` format: "20ms", "1s",
    "6m0s", "1m30.5s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    tail = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{tail}"
    return f"{minutes}m{tail}" if minutes else tail


class OpenAIWire(Wire):
    name = "openai"
    key_hint = "an Authorization: Bearer header"

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None

    def new_id(self) -> str:
        return "chatcmpl-" + random_id(29)

    def call_id(self, model: str) -> str:
        return "call_" + random_id(24)

    def service_headers(self, seconds: float, simulator_header: bool) -> list[tuple[bytes, bytes]]:
        """OpenAI reports its processing time on every response, errors and streams included, as
        ``openai-processing-ms``: whole milliseconds."""
        return [
            (b"openai-processing-ms", str(round(seconds * 1000)).encode()),
            *super().service_headers(seconds, simulator_header),
        ]

    def parse(self, body: Any, path_model: str | None, stream: bool) -> SimRequest:
        if not isinstance(body, Mapping):
            raise BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        messages = body.get("messages")
        if messages is None:
            raise BadRequest("Missing required parameter: 'messages'.", "messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Invalid 'messages': expected a non-empty array.", "messages")
        transcript: list[tuple[str, str]] = []
        images: list[Image] = []
        # Calls of the last assistant message still waiting for their tool messages (id -> name).
        pending: dict[str, str] = {}
        asked_at = 0
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, Mapping) else None
            if role not in _ROLES:
                raise BadRequest(f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role")
            text, shown = _content(m.get("content"), f"messages[{i}].content", i)
            if shown and role != "user":
                raise BadRequest(
                    f"Invalid 'messages[{i}]'. Image URLs are only allowed for messages with role 'user', "
                    f"but this message with role '{role}' contains an image URL.",
                    f"messages[{i}]",
                    "invalid_value",
                )
            images += [dataclasses.replace(image, turn=len(transcript)) for image in shown]
            mapped = _ROLES[role]
            if pending and role not in ("tool", "function"):
                raise _unanswered(pending, asked_at)
            if role == "assistant":
                calls = _assistant_calls(m, f"messages[{i}]")
                said = [
                    tool_call_text(c["function"]["name"], c["function"]["arguments"])
                    for c in m.get("tool_calls") or ()
                ]
                legacy = m.get("function_call")
                if isinstance(legacy, Mapping):
                    said.append(tool_call_text(str(legacy.get("name")), str(legacy.get("arguments", ""))))
                if said:  # a plain assistant turn (a partial answer to continue) is kept as sent
                    text = "\n".join([text, *said]).strip()
                if calls:
                    pending, asked_at = calls, i
            elif role == "tool":
                call_id = m.get("tool_call_id")
                if call_id is None:
                    raise BadRequest(
                        "Missing parameter 'tool_call_id': messages with role 'tool' must have a "
                        "'tool_call_id'.",
                        f"messages.[{i}].tool_call_id",
                    )
                if call_id not in pending:
                    raise BadRequest(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                        "message with 'tool_calls'.",
                        f"messages.[{i}].role",
                    )
                text = tool_result_text(pending.pop(call_id), text)
            elif role == "function":
                name = m.get("name")
                if not isinstance(name, str):
                    raise _missing(f"messages[{i}].name")
                text = tool_result_text(name, text)
            if mapped == "system" and len(transcript) == 1 and transcript[0][0] == "system":
                transcript[0] = ("system", transcript[0][1] + "\n\n" + text)  # leading system messages merge
            else:
                transcript.append((mapped, text))
        if pending:
            raise _unanswered(pending, asked_at)
        unknown = sorted(k for k in body if k not in _FIELDS)
        if unknown:
            raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}")
        tools = _tool_use(body)
        output = _response_format(body, transcript)
        temperature = _number(body, "temperature", 0, 2)
        top_p = _number(body, "top_p", 0, 1)
        max_tokens = _integer(body, "max_completion_tokens", 1)
        legacy_max = _integer(body, "max_tokens", 1)
        seed = _integer(body, "seed")
        stop = _stop(body)
        options = body.get("stream_options")
        is_stream = bool(body.get("stream"))
        if max_tokens is None:
            max_tokens = legacy_max
        found = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "stop": list(stop) if stop is not None else None,
            "seed": seed,
            "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
            "presence_penalty": _number(body, "presence_penalty", -2, 2),
            "logit_bias": body.get("logit_bias"),
            "reasoning_effort": body.get("reasoning_effort"),
        }
        return SimRequest(
            model=model,
            transcript=tuple(transcript),
            stream=is_stream,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or (),
            include_usage=is_stream and isinstance(options, Mapping) and bool(options.get("include_usage")),
            include_obfuscation=not (
                isinstance(options, Mapping) and options.get("include_obfuscation") is False
            ),
            params={k: v for k, v in found.items() if v is not None},
            tools=tools,
            tool_tokens=declared_tokens(tools),
            output=output,
            images=tuple(images),
        )

    def no_vision(self, req: SimRequest, image: Image) -> BadRequest:
        """A model that takes no images refuses one as GPT-3.5 does (as reported verbatim in public
        issue threads), naming the part's type."""
        return BadRequest(_NO_VISION, image.where)

    def missing_key(self, request_id: str) -> tuple[int, bytes]:
        body = {"message": _NO_KEY, "type": "invalid_request_error", "param": None, "code": None}
        return Err.AUTH.value, dumps({"error": body})

    def invalid_key(self, key: str, request_id: str) -> tuple[int, bytes]:
        message = (
            f"Incorrect API key provided: {mask_key(key)}. "
            "You can find your API key at https://platform.openai.com/account/api-keys."
        )
        return Err.AUTH.value, self.error(Err.AUTH, message, request_id)

    def refused(self, param: str, model: str) -> BadRequest:
        return BadRequest(
            f"Unsupported parameter: '{param}' is not supported with this model.",
            param,
            "unsupported_parameter",
        )

    def rate_limited(
        self, model: str, retry_after_s: float | None, request_id: str, now: float
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """OpenAI documents no Retry-After: the wait is in the rate-limit headers (Rate limits guide,
        "Rate limits in headers"), the spent limit's remaining 0 and its reset a Go duration. Here
        the spent limit is requests; the limits themselves are nominal (the simulator has none)."""
        body = self.error(
            Err.RATE_LIMIT, self.fault_message(Err.RATE_LIMIT, model, retry_after_s), request_id
        )
        if retry_after_s is None:
            return [], body
        headers = {
            "x-ratelimit-limit-requests": str(NOMINAL_RPM),
            "x-ratelimit-limit-tokens": str(NOMINAL_TPM),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-remaining-tokens": str(NOMINAL_TPM),
            "x-ratelimit-reset-requests": go_duration(retry_after_s),
            "x-ratelimit-reset-tokens": "0s",
        }
        return [(k.encode(), v.encode()) for k, v in headers.items()], body

    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        type_, default_code = _ERRORS[kind]
        body = {"message": message, "type": type_, "param": param, "code": code or default_code}
        return dumps({"error": body})

    @staticmethod
    def _fingerprint(model: str) -> str:
        return f"fp_{stable_hash('fp', model) % 16**10:010x}"

    @staticmethod
    def _usage(c: Completion) -> dict[str, Any]:
        return {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    @staticmethod
    def _legacy(req: SimRequest) -> bool:
        return req.tools is not None and req.tools.legacy_functions

    def _finish(self, req: SimRequest, c: Completion) -> str:
        if c.calls and self._legacy(req):
            return "function_call"
        return _FINISH[c.finish]

    def _message(self, req: SimRequest, c: Completion) -> dict[str, Any]:
        """The answer's message: its text, or (content null) its calls: ``tool_calls`` whose
        arguments are JSON text, or under the legacy ``functions`` one ``function_call``."""
        if c.refused:  # the refusal stands in for the content, which is null
            return {"role": "assistant", "content": None, "refusal": c.text, "annotations": []}
        if not c.calls:
            return {"role": "assistant", "content": c.text, "refusal": None, "annotations": []}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if self._legacy(req):
            call = c.calls[0]
            message["function_call"] = {"name": call.name, "arguments": call.arguments}
        else:
            message["tool_calls"] = [
                {"id": k.id, "type": "function", "function": {"name": k.name, "arguments": k.arguments}}
                for k in c.calls
            ]
        return message | {"refusal": None, "annotations": []}

    def response(self, req: SimRequest, c: Completion) -> bytes:
        return dumps(
            {
                "id": c.id,
                "object": "chat.completion",
                "created": c.created,
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "message": self._message(req, c),
                        "logprobs": None,
                        "finish_reason": self._finish(req, c),
                    }
                ],
                "usage": self._usage(c),
                "service_tier": "default",
                "system_fingerprint": self._fingerprint(req.model),
            }
        )

    def _chunk(self, req: SimRequest, c: Completion, choices: list[Any], **extra: Any) -> bytes:
        chunk = {
            "id": c.id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": req.model,
            "service_tier": "default",
            "system_fingerprint": self._fingerprint(req.model),
            "choices": choices,
        }
        if req.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        if req.include_obfuscation:
            # Random padding that hides each chunk's true size (a side-channel mitigation); the
            # API sends it by default on every chunk.
            chunk["obfuscation"] = random_id(secrets.randbelow(16))
        return sse(chunk)

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        # A refusal streams in ``delta.refusal`` (opened empty, content null), as the API streams one
        # (tests/fixtures/providers/openai/chat_completion_parse_refusal.stream.sse).
        delta: dict[str, Any] = {"role": "assistant", "content": None if c.calls else "", "refusal": None}
        if c.refused:
            delta = {"role": "assistant", "content": None, "refusal": ""}
        return self._chunk(req, c, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        said = {"refusal": piece} if c.refused else {"content": piece}
        choice = {"index": 0, "delta": said, "logprobs": None, "finish_reason": None}
        return self._chunk(req, c, [choice])

    def call_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """Each call as OpenAI streams it: a delta naming it (its ``index``, ``id``, ``type`` and
        ``function.name``, arguments empty), then deltas carrying fragments of its arguments,
        under the same ``index``. The legacy ``functions`` stream ``delta.function_call`` alike."""
        events: list[tuple[str, bytes]] = []

        def delta(body: dict[str, Any]) -> bytes:
            return self._chunk(req, c, [{"index": 0, "delta": body, "logprobs": None, "finish_reason": None}])

        for k, call in enumerate(c.calls[:1] if self._legacy(req) else c.calls):
            if self._legacy(req):
                events.append(("", delta({"function_call": {"name": call.name, "arguments": ""}})))
                events += [
                    (p, delta({"function_call": {"arguments": p}})) for p in argument_pieces(call.arguments)
                ]
                continue
            opening = {
                "index": k,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            events.append(("", delta({"tool_calls": [opening]})))
            events += [
                (p, delta({"tool_calls": [{"index": k, "function": {"arguments": p}}]}))
                for p in argument_pieces(call.arguments)
            ]
        return events

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        out = self._chunk(
            req, c, [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": self._finish(req, c)}]
        )
        if req.include_usage:
            out += self._chunk(req, c, [], usage=self._usage(c))
        return out + b"data: [DONE]\n\n"
