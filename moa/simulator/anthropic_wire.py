"""The Anthropic Messages wire format (``POST /v1/messages``), with its named-event stream."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from moa.simulator.wire import (
    BadRequest,
    Completion,
    Err,
    SimRequest,
    Wire,
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
_STOP_REASON = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}
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
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, Mapping) else None
            if role not in ("user", "assistant"):
                raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            transcript.append((role, _text(m.get("content"), f"messages.{i}.content")))
        last_role, last_text = transcript[-1]
        if last_role == "assistant" and last_text != last_text.rstrip():
            # As the Messages API refuses a prefill it could not continue cleanly.
            raise BadRequest("messages: final assistant content cannot end with trailing whitespace")
        unknown = sorted(k for k in body if k not in _FIELDS)
        if unknown:
            raise BadRequest(f"{unknown[0]}: Extra inputs are not permitted")
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

    def _message(self, req: SimRequest, c: Completion, *, done: bool) -> dict[str, Any]:
        return {
            "id": c.id,
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": c.text}] if done else [],
            "stop_reason": _STOP_REASON[c.finish] if done else None,
            "stop_sequence": c.stop_sequence if done else None,
            "usage": self._usage(c, c.completion_tokens if done else 1),
        }

    def response(self, req: SimRequest, c: Completion) -> bytes:
        return dumps(self._message(req, c, done=True))

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        return (
            sse({"type": "message_start", "message": self._message(req, c, done=False)}, "message_start")
            + sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            )
            + sse({"type": "ping"}, "ping")
        )

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        return sse(delta, "content_block_delta")

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        return (
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
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
