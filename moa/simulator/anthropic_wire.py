"""The Anthropic Messages wire format (``POST /v1/messages``), with its named-event stream."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from moa.simulator.images import Image, anthropic_tokens, assumed, b64decode, sniff
from moa.simulator.structured import OutputFormat
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
    random_id,
    seconds_text,
    sse,
)

_ERRORS = {
    Err.BAD_REQUEST: "invalid_request_error",
    Err.AUTH: "authentication_error",
    Err.NOT_FOUND: "not_found_error",
    Err.RATE_LIMIT: "rate_limit_error",
    Err.SERVER: "api_error",
    Err.UNAVAILABLE: "overloaded_error",
}
_STOP_REASON = {
    "stop": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "refusal": "refusal",
}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_CHOICES = ("auto", "any", "tool", "none")
# A tool whose arguments the model wrote as malformed JSON: the Messages API returns ``input`` as
# an object, so the text the model wrote is wrapped in one (the key is the one Anthropic's
# fine-grained tool streaming guide suggests for passing such text back).
INVALID_JSON = "INVALID_JSON"
# Every top-level field of a Messages request the API knows; anything else is "Extra inputs are not
# permitted" (there is no seed in this API). temperature, top_p and top_k are still accepted though
# the SDK no longer models them (it sends them through extra_body).
_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
        "container", "mcp_servers", "context_management", "output_config", "cache_control",
        "inference_geo", "speed", "diagnostics",
    }
)  # fmt: skip
# The protocol's names of the common generation parameters.
_NAMES = {"stop": "stop_sequences"}


def _unit_interval(body: Mapping[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not is_number(v):
        raise BadRequest(f"{name}: Input should be a valid number")
    if v < 0:
        raise BadRequest(f"{name}: Input should be greater than or equal to 0")
    if v > 1:
        raise BadRequest(f"{name}: Input should be less than or equal to 1")
    return float(v)


_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_SOURCES = ("base64", "file", "url")


def _image(block: Mapping[str, Any], at: str) -> Image:
    """An ``image`` block (``at``: its path, ``messages.0.content.1``), checked in the API's words
    (as reported verbatim in public issue threads): base64 data is decoded and measured, and must
    be the image its media type says; a URL or a file is never fetched (its size assumed)."""
    source = block.get("source")
    if source is None:
        raise BadRequest(f"{at}.image.source: Field required")
    if not isinstance(source, Mapping):
        raise BadRequest(
            f"{at}.image.source: Input should be a valid dictionary or object to extract fields from"
        )
    kind = source.get("type")
    if kind not in _SOURCES:
        raise BadRequest(
            f"{at}.image.source: Input tag '{kind}' found using 'type' does not match any of the expected "
            "tags: 'base64', 'file', 'url'"
        )
    where = f"{at}.image.source.{kind}"
    if kind == "url":
        if not isinstance(source.get("url"), str):
            raise BadRequest(f"{where}.url: Field required")
        image = assumed("url")
    elif kind == "file":
        if not isinstance(source.get("file_id"), str):
            raise BadRequest(f"{where}.file_id: Field required")
        image = assumed("file")
    else:
        media_type, data = source.get("media_type"), source.get("data")
        if media_type is None:
            raise BadRequest(f"{where}.media_type: Field required")
        if media_type not in _MEDIA_TYPES:
            raise BadRequest(
                f"{where}.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
            )
        if not isinstance(data, str):
            raise BadRequest(f"{where}.data: Field required")
        if not data:
            raise BadRequest(f"{where}: image cannot be empty")
        raw = b64decode(data)
        if raw is None:
            raise BadRequest(f"{where}: invalid base64 data")
        found = sniff(raw)
        if found is None:
            raise BadRequest("Could not process image")
        if found[0] != media_type:
            raise BadRequest(f"{where}.data: Image does not match the provided media type {media_type}")
        image = Image("data", found[0], found[1], found[2], measured=True)
    return dataclasses.replace(image, tokens=anthropic_tokens(image.width, image.height), where=at)


def _images(content: Any, where: str) -> list[Image]:
    """The image blocks of a message's content (``where``: ``messages.0.content``)."""
    return [
        _image(block, f"{where}.{j}")
        for j, block in enumerate(content if isinstance(content, list) else ())
        if isinstance(block, Mapping) and block.get("type") == "image"
    ]


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if not isinstance(block, Mapping) or "type" not in block:
                raise BadRequest(f"{where}.{i}.type: Field required")
            if block["type"] == "text":
                if not isinstance(block.get("text"), str):
                    raise BadRequest(f"{where}.{i}.text: Field required")
                parts.append(block["text"])
        return "\n".join(parts)
    raise BadRequest(f"{where}: Input should be a valid string or a list of content blocks")


def _tool_uses(content: Any, where: str) -> dict[str, str]:
    """An assistant turn's tool_use blocks (id -> name), checked as the API checks them."""
    out: dict[str, str] = {}
    for j, block in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(block, Mapping) or block.get("type") != "tool_use":
            continue
        at = f"{where}.{j}.tool_use"
        for key in ("id", "name", "input"):
            if key not in block:
                raise BadRequest(f"{at}.{key}: Field required")
        if not isinstance(block["id"], str) or not _TOOL_USE_ID.match(block["id"]):
            raise BadRequest(f"{at}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if not isinstance(block["name"], str):
            raise BadRequest(f"{at}.name: Input should be a valid string")
        if not isinstance(block["input"], Mapping):
            raise BadRequest(f"{at}.input: Input should be a valid dictionary")
        out[block["id"]] = block["name"]
    return out


def _tool_results(content: Any, where: str) -> list[tuple[int, str, str]]:
    """A user turn's tool_result blocks: (block index, tool_use_id, result text)."""
    out = []
    for j, block in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(block, Mapping) or block.get("type") != "tool_result":
            continue
        at = f"{where}.{j}.tool_result"
        if "tool_use_id" not in block:
            raise BadRequest(f"{at}.tool_use_id: Field required")
        if not isinstance(block["tool_use_id"], str):
            raise BadRequest(f"{at}.tool_use_id: Input should be a valid string")
        is_error = block.get("is_error")
        if is_error is not None and not isinstance(is_error, bool):
            raise BadRequest(f"{at}.is_error: Input should be a valid boolean")
        inner = block.get("content", "")
        text = _text(inner, f"{at}.content")
        out.append((j, block["tool_use_id"], ("error: " if is_error else "") + text))
    return out


def _tool_use(body: Mapping[str, Any]) -> ToolUse | None:
    """The request's custom tools and tool_choice; server tools (typed, like web search) run on
    Anthropic's side, so the simulated model never calls them."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise BadRequest("tool_choice: tool_choice may only be specified while providing tools")
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools: Input should be a valid list")
    declared: list[Tool] = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise BadRequest(
                f"tools.{i}: Input should be a valid dictionary or object to extract fields from"
            )
        if t.get("type", "custom") != "custom":
            continue
        at = f"tools.{i}.custom"
        for key in ("name", "input_schema"):
            if key not in t:
                raise BadRequest(f"{at}.{key}: Field required")
        name, schema = t["name"], t["input_schema"]
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise BadRequest(f"{at}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if not isinstance(schema, Mapping):
            raise BadRequest(f"{at}.input_schema: Input should be a valid dictionary")
        if schema.get("type") != "object":
            raise BadRequest(f"{at}.input_schema.type: Input should be 'object'")
        description = t.get("description", "")
        if not isinstance(description, str):
            raise BadRequest(f"{at}.description: Input should be a valid string")
        if any(d.name == name for d in declared):
            raise BadRequest("tools: Tool names must be unique.")
        declared.append(Tool(name, description, schema, strict=t.get("strict") is True))
    mode: Mode = "auto"
    allowed: tuple[str, ...] = ()
    parallel = True
    if choice is not None:
        if not isinstance(choice, Mapping):
            raise BadRequest(
                "tool_choice: Input should be a valid dictionary or object to extract fields from"
            )
        kind = choice.get("type")
        if kind not in _CHOICES:
            raise BadRequest(
                f"tool_choice: Input tag '{kind}' found using 'type' does not match any of the expected "
                "tags: 'auto', 'any', 'tool', 'none'"
            )
        disable = choice.get("disable_parallel_tool_use")
        if disable is not None and not isinstance(disable, bool):
            raise BadRequest(f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean")
        parallel = not disable
        if kind == "tool":
            name = choice.get("name")
            if not isinstance(name, str):
                raise BadRequest("tool_choice.tool.name: Field required")
            if name not in {d.name for d in declared}:
                raise BadRequest(f"tool_choice.tool.name: Tool '{name}' not found in provided tools")
            allowed = (name,)
        mode = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}[kind]  # type: ignore[assignment]
    return ToolUse(
        tools=tuple(declared), mode=mode, allowed=allowed, parallel=parallel, preamble=mode == "auto"
    )


def _turns(
    messages: list[Any], has_tools: bool, transcript: list[tuple[str, str]], images: list[Image]
) -> None:
    """The messages as transcript turns (appended to ``transcript``; the user turns' images to
    ``images``), tool_use and tool_result blocks checked as the API checks them: every tool_use
    answered by a tool_result in the very next (user) message, every tool_result answering a
    tool_use of the message before, and tools declared for either."""
    asked: dict[str, str] = {}  # the previous assistant turn's tool_use ids -> names
    asked_at = -1
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = m.get("content")
        where = f"messages.{i}.content"
        text = _text(content, where)
        uses = _tool_uses(content, where) if role == "assistant" else {}
        results = _tool_results(content, where) if role == "user" else []
        shown = _images(content, where) if role == "user" else []
        if (uses or results) and not has_tools:
            raise BadRequest("Requests which include `tool_use` or `tool_result` blocks must define tools.")
        answered = {tid for _, tid, _ in results}
        if asked and not set(asked) <= answered:
            missing = ", ".join(t for t in asked if t not in answered)
            raise BadRequest(
                f"messages.{asked_at}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {missing}. Each `tool_use` block must have a corresponding `tool_result` block in "
                "the next message."
            )
        for j, tid, result in results:
            if tid not in asked:
                raise BadRequest(
                    f"{where}.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {tid}. Each "
                    "`tool_result` block must have a corresponding `tool_use` block in the previous message."
                )
            transcript.append(("tool", tool_result_text(asked[tid], result)))
        if uses:  # the calls join the turn's text; a plain turn (a prefill) is kept as sent
            calls = [
                tool_call_text(b["name"], dumps(b["input"]).decode())
                for b in content
                if isinstance(b, Mapping) and b.get("type") == "tool_use"
            ]
            text = "\n".join([text, *calls]).strip()
        if text or not results or shown:
            images += [dataclasses.replace(image, turn=len(transcript)) for image in shown]
            transcript.append((role, text))
        asked, asked_at = uses, i
    if asked:
        missing = ", ".join(asked)
        raise BadRequest(
            f"messages.{asked_at}: `tool_use` ids were found without `tool_result` blocks immediately "
            f"after: {missing}. Each `tool_use` block must have a corresponding `tool_result` block in "
            "the next message."
        )


# Structured outputs' JSON Schema limits (the guide's "JSON Schema limitations"): keywords it does
# not support, by type. The API answers them with a 400 "with details"; the wording here is the
# simulator's own.
_UNSUPPORTED = {
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "string": ("minLength", "maxLength"),
    "array": ("maxItems",),
}
_EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _claude_schema(schema: Mapping[str, Any], path: str = "") -> None:
    """What Claude's structured outputs refuse in a schema: an object that allows additional
    properties, a numerical or string-length constraint, an array bound other than ``minItems``
    of 0 or 1 (each named with the property's path)."""
    where = "output_config.format.schema"
    at = f" (at {path.lstrip('.')})" if path else ""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    is_object = "object" in kinds or "properties" in schema
    if is_object and schema.get("additionalProperties") is not False:
        raise BadRequest(
            f"{where}: For 'object' type, 'additionalProperties' must be explicitly set to false{at}"
        )
    for k in kinds:
        for key in _UNSUPPORTED.get(k, ()) if isinstance(k, str) else ():
            if key in schema:
                raise BadRequest(f"{where}: For '{k}' type, property '{key}' is not supported{at}")
    low = schema.get("minItems")
    if low is not None and low not in (0, 1):
        raise BadRequest(
            f"{where}: For 'array' type, 'minItems' values other than 0 or 1 are not supported{at}"
        )
    for key, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, Mapping):
            _claude_schema(sub, f"{path}.properties.{key}")
    if isinstance(schema.get("items"), Mapping):
        _claude_schema(schema["items"], f"{path}.items")
    for key in ("anyOf", "allOf", "$defs", "definitions"):
        subs = schema.get(key)
        named = (
            enumerate(subs) if isinstance(subs, list) else subs.items() if isinstance(subs, Mapping) else ()
        )
        for name, sub in named:
            if isinstance(sub, Mapping):
                _claude_schema(sub, f"{path}.{key}.{name}")


def _output_config(body: Mapping[str, Any]) -> OutputFormat | None:
    """The request's ``output_config``: its ``effort``, and the JSON document ``format`` asks for."""
    config = body.get("output_config")
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise BadRequest("output_config: Input should be a valid dictionary or object to extract fields from")
    for key in config:
        if key not in ("effort", "format"):
            raise BadRequest(f"output_config.{key}: Extra inputs are not permitted")
    effort = config.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise BadRequest("output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise BadRequest(
            "output_config.format: Input should be a valid dictionary or object to extract fields from"
        )
    for key in fmt:
        if key not in ("type", "schema"):
            raise BadRequest(f"output_config.format.{key}: Extra inputs are not permitted")
    if "type" not in fmt:
        raise BadRequest("output_config.format.type: Field required")
    if fmt["type"] != "json_schema":
        raise BadRequest("output_config.format.type: Input should be 'json_schema'")
    schema = fmt.get("schema")
    if schema is None:
        raise BadRequest("output_config.format.schema: Field required")
    if not isinstance(schema, Mapping):
        raise BadRequest("output_config.format.schema: Input should be a valid dictionary")
    _claude_schema(schema)
    # Constrained decoding holds the answer to the schema, and Claude writes required properties
    # first (the guide's "Property ordering").
    return OutputFormat("json_schema", schema, strict=True, required_first=True)


class AnthropicWire(Wire):
    name = "anthropic"
    key_hint = "the x-api-key header (or Authorization: Bearer)"
    stream_content_type = b"text/event-stream; charset=utf-8"
    # Claude's current models (Sonnet 4.5, Haiku 4.5, Opus 4.1 and later) take one or the other.
    exclusive_sampling = True

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        # Newer SDK releases send the key as a bearer token; older ones (and curl examples) as x-api-key.
        key = headers.get("x-api-key")
        if key:
            return key
        auth = headers.get("authorization", "")
        return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None

    def new_id(self) -> str:
        return "msg_01" + random_id(22)

    def call_id(self, model: str) -> str:
        return "toolu_01" + random_id(22)

    def request_id_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        # The SDK exposes ``request-id`` as ``_request_id``; x-request-id is the simulator's common header.
        rid = request_id.encode()
        return [(b"request-id", rid), (b"x-request-id", rid)]

    def parse(self, body: Any, path_model: str | None, stream: bool) -> SimRequest:
        if not isinstance(body, Mapping):
            raise BadRequest("Input should be a valid dictionary")
        for field in ("model", "max_tokens", "messages"):
            if field not in body:
                raise BadRequest(f"{field}: Field required")
        model, max_tokens, messages = body["model"], body["max_tokens"], body["messages"]
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Input should be a valid string")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required")
        transcript: list[tuple[str, str]] = []
        system = body.get("system")
        if system is not None:
            transcript.append(("system", _text(system, "system")))
        unknown = sorted(k for k in body if k not in _FIELDS)
        if unknown:
            raise BadRequest(f"{unknown[0]}: Extra inputs are not permitted")
        tools = _tool_use(body)
        images: list[Image] = []
        _turns(messages, tools is not None, transcript, images)
        last_role, last_text = transcript[-1]
        if last_role == "assistant" and last_text != last_text.rstrip():
            # As the Messages API refuses a prefill it could not continue cleanly.
            raise BadRequest("messages: final assistant content cannot end with trailing whitespace")
        output = _output_config(body)
        if output is not None and last_role == "assistant":
            # The guide: prefilling is incompatible with JSON outputs (the wording is the simulator's).
            raise BadRequest(
                "messages: a final assistant message (prefill) cannot be used with output_config.format"
            )
        temperature = _unit_interval(body, "temperature")
        top_p = _unit_interval(body, "top_p")
        top_k = body.get("top_k")
        if top_k is not None and (not is_integer(top_k) or top_k < 0):
            raise BadRequest("top_k: Input should be a valid integer greater than or equal to 0")
        stop = body.get("stop_sequences")
        if stop is not None and not isinstance(stop, list):
            raise BadRequest("stop_sequences: Input should be a valid list")
        for i, seq in enumerate(stop or ()):
            if not isinstance(seq, str):
                raise BadRequest(f"stop_sequences.{i}: Input should be a valid string")
        found = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop}
        return SimRequest(
            model=model,
            transcript=tuple(transcript),
            stream=bool(body.get("stream")),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop or ()),
            params={k: v for k, v in found.items() if v is not None},
            prompt_caching=_asks_for_caching(body),
            tools=tools,
            tool_tokens=declared_tokens(tools),
            output=output,
            images=tuple(images),
        )

    def status(self, kind: Err) -> int:
        # The Errors page: "529 - overloaded_error: The API is temporarily overloaded."
        return 529 if kind is Err.UNAVAILABLE else kind.value

    # The API's own words; neither echoes any part of the key.
    def missing_key(self, request_id: str) -> tuple[int, bytes]:
        return Err.AUTH.value, self.error(Err.AUTH, "x-api-key header is required", request_id)

    def invalid_key(self, key: str, request_id: str) -> tuple[int, bytes]:
        return Err.AUTH.value, self.error(Err.AUTH, "invalid x-api-key", request_id)

    def refused(self, param: str, model: str) -> BadRequest:
        # What the API says to temperature on the models that dropped it (claude-opus-4-7 and later).
        return BadRequest(f"`{_NAMES.get(param, param)}` is deprecated for this model.")

    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        return dumps(
            {"type": "error", "error": {"type": _ERRORS[kind], "message": message}, "request_id": request_id}
        )

    def rate_limited(
        self, model: str, retry_after_s: float | None, request_id: str, now: float
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Anthropic's Rate limits page: a 429 carries ``retry-after`` (seconds), and the spent
        limit's ``anthropic-ratelimit-*`` headers say it has 0 left until an RFC 3339 reset. The
        limit is nominal; a fractional wait configured for a test stays fractional."""
        body = self.error(
            Err.RATE_LIMIT, self.fault_message(Err.RATE_LIMIT, model, retry_after_s), request_id
        )
        if retry_after_s is None:
            return [], body
        reset = datetime.fromtimestamp(math.ceil(now + retry_after_s), UTC)
        headers = {
            "retry-after": seconds_text(retry_after_s),
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return [(k.encode(), v.encode()) for k, v in headers.items()], body

    def fault_message(self, kind: Err, model: str, retry_after_s: float | None) -> str:
        if kind is Err.RATE_LIMIT:
            return (
                "This request would exceed the rate limit for your organization of requests per minute "
                f"for {model} (simulated). Please try again later."
            )
        if kind is Err.UNAVAILABLE:
            return "Overloaded (simulated)"
        return "Internal server error (simulated)"

    @staticmethod
    def _usage(c: Completion, output_tokens: int) -> dict[str, Any]:
        # As in the real API, input_tokens excludes the tokens read from the cache.
        return {
            "input_tokens": c.prompt_tokens - c.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": c.cached_tokens,
            # The cache writes split by TTL (the caching guide's usage); the simulator writes none.
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    @staticmethod
    def _tool_block(call: Any, *, started: bool = False) -> dict[str, Any]:
        """A tool_use block; ``started``: as content_block_start opens it, its input still empty."""
        args = call.args
        arguments = {} if started else args if args is not None else {INVALID_JSON: call.arguments}
        block = {"type": "tool_use", "id": call.id, "name": call.name}
        return block | {"caller": {"type": "direct"}, "input": arguments}

    def _content(self, c: Completion) -> list[dict[str, Any]]:
        text = [{"type": "text", "text": c.text}] if c.text or not c.calls else []
        return text + [self._tool_block(k) for k in c.calls]

    def _message(self, req: SimRequest, c: Completion, *, done: bool) -> dict[str, Any]:
        return {
            "id": c.id,
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": self._content(c) if done else [],
            "stop_reason": _STOP_REASON[c.finish] if done else None,
            "stop_sequence": c.stop_sequence if done else None,
            "usage": self._usage(c, c.completion_tokens if done else 1),
        }

    def response(self, req: SimRequest, c: Completion) -> bytes:
        return dumps(self._message(req, c, done=True))

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        head = sse({"type": "message_start", "message": self._message(req, c, done=False)}, "message_start")
        if c.text or not c.calls:
            block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
            head += sse(block, "content_block_start")
        return head + sse({"type": "ping"}, "ping")

    def call_events(self, req: SimRequest, c: Completion) -> list[tuple[str, bytes]]:
        """Each call as Claude streams it: content_block_start with the tool_use block (input
        empty), input_json_delta events carrying fragments of its input's JSON (the first one
        empty), content_block_stop; the text block before them is closed first."""
        events: list[tuple[str, bytes]] = []
        first = 1 if c.text else 0
        for k, call in enumerate(c.calls):
            index = first + k
            opening = (
                sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
                if k == 0 and first
                else b""
            )
            start = {
                "type": "content_block_start",
                "index": index,
                "content_block": self._tool_block(call, started=True),
            }
            opening += sse(start, "content_block_start") + self._json_delta(index, "")
            cut = argument_pieces(call.arguments)
            events.append(("", opening))
            events += [(p, self._json_delta(index, p)) for p in cut]
            stop = sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            events[-1] = (events[-1][0], events[-1][1] + stop)
        return events

    @staticmethod
    def _json_delta(index: int, partial: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": partial}
        return sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        return sse(delta, "content_block_delta")

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        closing = b"" if c.calls else sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        return (
            closing
            + sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _STOP_REASON[c.finish], "stop_sequence": c.stop_sequence},
                    "usage": {"output_tokens": c.completion_tokens},
                },
                "message_delta",
            )
            + sse({"type": "message_stop"}, "message_stop")
        )


def _asks_for_caching(value: Any) -> bool:
    """Whether a request marks anything ``cache_control`` (at the top level or on any block): the
    Messages API caches a prompt only when asked to."""
    if isinstance(value, dict):
        return "cache_control" in value or any(_asks_for_caching(v) for v in value.values())
    if isinstance(value, list):
        return any(_asks_for_caching(v) for v in value)
    return False
