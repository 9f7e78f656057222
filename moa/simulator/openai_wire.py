"""The OpenAI Chat Completions wire format (``POST /v1/chat/completions``), streaming included."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from moa.simulator.text import stable_hash
from moa.simulator.wire import (
    BadRequest,
    Completion,
    Err,
    SimRequest,
    Wire,
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
_FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or "type" not in part:
                raise BadRequest(f"Invalid type for '{where}[{i}]': expected an object with a type.", where)
            if part["type"] == "text":
                parts.append(str(part.get("text", "")))
        return "\n".join(parts)
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
    return BadRequest(
        f"Invalid type for '{name}': expected {expected}, but got {json_type(v)} instead.",
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
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, Mapping) else None
            if role not in _ROLES:
                raise BadRequest(f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role")
            text = _text(m.get("content"), f"messages[{i}].content")
            mapped = _ROLES[role]
            if mapped == "system" and len(transcript) == 1 and transcript[0][0] == "system":
                transcript[0] = ("system", transcript[0][1] + "\n\n" + text)  # leading system messages merge
            else:
                transcript.append((mapped, text))
        unknown = sorted(k for k in body if k not in _FIELDS)
        if unknown:
            raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}")
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
        )

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
                        "message": {
                            "role": "assistant",
                            "content": c.text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": _FINISH[c.finish],
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
        delta = {"role": "assistant", "content": "", "refusal": None}
        return self._chunk(req, c, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
        return self._chunk(req, c, [choice])

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        out = self._chunk(
            req, c, [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": _FINISH[c.finish]}]
        )
        if req.include_usage:
            out += self._chunk(req, c, [], usage=self._usage(c))
        return out + b"data: [DONE]\n\n"
