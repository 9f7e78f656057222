"""The Gemini API wire format (``models/{model}:generateContent`` and ``:streamGenerateContent``).

Like the real API, zero-valued usage fields are omitted (``cachedContentTokenCount`` appears only
when something was cached, ``candidatesTokenCount`` only once text was produced), so clients must
treat them as optional.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    sse,
)
from moa.tokens import approx_tokens

_STATUS = {
    Err.BAD_REQUEST: "INVALID_ARGUMENT",
    Err.AUTH: "UNAUTHENTICATED",
    Err.NOT_FOUND: "NOT_FOUND",
    Err.RATE_LIMIT: "RESOURCE_EXHAUSTED",
    Err.SERVER: "INTERNAL",
    Err.UNAVAILABLE: "UNAVAILABLE",
}


def proto_duration(seconds: float) -> str:
    """A duration in protobuf's JSON form: seconds, with 0, 3, 6 or 9 fractional digits, and "s"."""
    whole, nanos = divmod(round(seconds * 1e9), 10**9)
    if not nanos:
        return f"{whole}s"
    digits = f"{nanos:09d}"
    for keep in (3, 6):
        if digits[keep:] == "0" * (9 - keep):
            return f"{whole}.{digits[:keep]}s"
    return f"{whole}.{digits}s"


_FINISH = {"stop": "STOP", "stop_sequence": "STOP", "length": "MAX_TOKENS"}
# The fields the API knows, top level and in generationConfig, in both spellings; anything else is
# refused by name ("Unknown name ...: Cannot find field.").
_FIELDS = frozenset(
    {
        "contents", "systemInstruction", "generationConfig", "safetySettings", "tools", "toolConfig",
        "cachedContent", "model",
    }
)  # fmt: skip
_CONFIG_FIELDS = frozenset(
    {
        "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
        "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
        "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
        "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig",
        "mediaResolution",
    }
)  # fmt: skip
MAX_STOP = 5
# The protocol's names of the common generation parameters.
_NAMES = {
    "top_p": "topP",
    "max_tokens": "maxOutputTokens",
    "stop": "stopSequences",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _unknown(obj: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for key in obj:
        if _camel(key) not in known:
            at = f" at '{where}'" if where else ""
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.')


def _in_range(config: Mapping[str, Any], camel: str, snake: str, hi: float, lo: float = 0.0) -> float | None:
    v = _field(config, camel, snake)
    if v is None:
        return None
    if not is_number(v):
        raise BadRequest(f"Invalid value at 'generation_config.{snake}' (TYPE_FLOAT), {v!r}")
    if not lo <= v <= hi:
        where = f"GenerateContentRequest.generation_config.{snake}"
        raise BadRequest(f"* {where}: {snake} must be in the range [{lo:.1f}, {hi:.1f}]")
    return float(v)


def _field(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """The REST API accepts both spellings of every field."""
    v = obj.get(camel)
    return obj.get(snake) if v is None else v


def _parts_text(content: Any, where: str) -> str:
    if not isinstance(content, Mapping):
        raise BadRequest(f"Invalid value at '{where}': expected a Content object")
    parts = content.get("parts")
    if not isinstance(parts, list):
        raise BadRequest(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.")
    texts = []
    for p in parts:
        if isinstance(p, Mapping) and isinstance(p.get("text"), str):
            texts.append(p["text"])
    return "".join(texts)


class GeminiWire(Wire):
    name = "gemini"
    key_hint = "the x-goog-api-key header or the key query parameter"
    stream_content_type = b"text/event-stream"

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or query.get("key") or None

    def new_id(self) -> str:
        return random_id(22)

    def parse(self, body: Any, path_model: str | None, stream: bool) -> SimRequest:
        if not isinstance(body, Mapping):
            raise BadRequest("Invalid JSON payload received. Expected an object.")
        model = (path_model or "").removeprefix("models/")
        if not model:
            raise BadRequest("* GenerateContentRequest.model: unexpected model name format")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        transcript: list[tuple[str, str]] = []
        system = _field(body, "systemInstruction", "system_instruction")
        if system is not None:
            transcript.append(("system", _parts_text(system, "system_instruction")))
        for i, c in enumerate(contents):
            role = c.get("role", "user") if isinstance(c, Mapping) else None
            if role not in ("user", "model"):
                raise BadRequest(f"Please use a valid role: user, model. (contents[{i}].role)")
            transcript.append(("assistant" if role == "model" else "user", _parts_text(c, f"contents[{i}]")))
        _unknown(body, _FIELDS, "")
        config = _field(body, "generationConfig", "generation_config") or {}
        if not isinstance(config, Mapping):
            raise BadRequest("Invalid value at 'generation_config': expected an object")
        _unknown(config, _CONFIG_FIELDS, "generation_config")
        max_tokens = _field(config, "maxOutputTokens", "max_output_tokens")
        if max_tokens is not None and not is_integer(max_tokens):
            raise BadRequest(
                f"Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), {max_tokens!r}"
            )
        if max_tokens is not None and max_tokens < 1:
            max_tokens = None  # the real API treats 0 as "unset"
        temperature = _in_range(config, "temperature", "temperature", 2.0)
        top_p = _in_range(config, "topP", "top_p", 1.0)
        seed = config.get("seed")
        if seed is not None and not is_integer(seed):
            raise BadRequest(f"Invalid value at 'generation_config.seed' (TYPE_INT32), {seed!r}")
        stop = _field(config, "stopSequences", "stop_sequences")
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
            raise BadRequest("Invalid value at 'generation_config.stop_sequences' (TYPE_STRING)")
        if stop and len(stop) > MAX_STOP:
            raise BadRequest(
                f"Unable to submit request because it has a stopSequences value of {len(stop)} but the "
                f"supported range is from 1 (inclusive) to {MAX_STOP + 1} (exclusive). "
                "Update the value and try again."
            )
        found = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "stop": stop,
            "seed": seed,
            "presence_penalty": _in_range(config, "presencePenalty", "presence_penalty", 2.0, -2.0),
            "frequency_penalty": _in_range(config, "frequencyPenalty", "frequency_penalty", 2.0, -2.0),
        }
        return SimRequest(
            model=model,
            transcript=tuple(transcript),
            stream=stream,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop or ()),
            params={k: v for k, v in found.items() if v is not None},
        )

    def missing_key(self, request_id: str) -> tuple[int, bytes]:
        # Not 401: the API refuses an anonymous caller with 403 PERMISSION_DENIED.
        message = (
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API."
        )
        return 403, dumps({"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}})

    def invalid_key(self, key: str, request_id: str) -> tuple[int, bytes]:
        # Not 401 either: a wrong key is a 400 INVALID_ARGUMENT whose ErrorInfo says API_KEY_INVALID,
        # and the key is never echoed.
        message = "API key not valid. Please pass a valid API key."
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ]
        body = {"code": 400, "message": message, "status": "INVALID_ARGUMENT", "details": details}
        return 400, dumps({"error": body})

    def refused(self, param: str, model: str) -> BadRequest:
        # In the words the API uses for features a model lacks ("Penalty is not enabled for models/...").
        return BadRequest(f"{_NAMES.get(param, param)} is not enabled for models/{model}")

    def error(
        self, kind: Err, message: str, request_id: str, param: str | None = None, code: str | None = None
    ) -> bytes:
        return dumps({"error": {"code": kind.value, "message": message, "status": _STATUS[kind]}})

    def rate_limited(
        self, model: str, retry_after_s: float | None, request_id: str, now: float
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """No header: the API puts the wait in the body, a ``google.rpc.RetryInfo`` among the error's
        details (its ``retryDelay`` a protobuf JSON duration), after the ``QuotaFailure`` naming
        the spent quota and a ``Help`` link, as in the 429 bodies the API sends."""
        message = self.fault_message(Err.RATE_LIMIT, model, retry_after_s)
        error: dict[str, Any] = {"code": 429, "message": message, "status": _STATUS[Err.RATE_LIMIT]}
        if retry_after_s is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "60",  # nominal: the simulator enforces no quota
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": proto_duration(retry_after_s),
                },
            ]
        return [], dumps({"error": error})

    def fault_message(self, kind: Err, model: str, retry_after_s: float | None) -> str:
        if kind is Err.RATE_LIMIT:
            if retry_after_s is not None:
                return (
                    "You exceeded your current quota, please check your plan and billing details. "
                    f"(simulated, model {model})\nPlease retry in {retry_after_s:g}s."
                )
            return f"Resource has been exhausted (e.g. check quota). (simulated, model {model})"
        if kind is Err.UNAVAILABLE:
            return "The model is overloaded. Please try again later. (simulated)"
        return (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting (simulated)"
        )

    @staticmethod
    def _usage(c: Completion, candidates: int | None) -> dict[str, Any]:
        usage: dict[str, Any] = {"promptTokenCount": c.prompt_tokens}
        if candidates:
            usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = c.prompt_tokens + (candidates or 0)
        if c.cached_tokens:
            usage["cachedContentTokenCount"] = c.cached_tokens
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": c.prompt_tokens}]
        return usage

    def _chunk(self, req: SimRequest, c: Completion, text: str, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        if final:
            candidate["finishReason"] = _FINISH[c.finish]
        candidate["index"] = 0
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(c, c.completion_tokens if final else None),
            "modelVersion": req.model,
            "responseId": c.id,
        }

    def response(self, req: SimRequest, c: Completion) -> bytes:
        return dumps(self._chunk(req, c, c.text, final=True))

    def stream_head(self, req: SimRequest, c: Completion) -> bytes:
        return b""

    def stream_delta(self, req: SimRequest, c: Completion, piece: str, last: bool) -> bytes:
        # The real stream puts the finish reason on the chunk with the last text, and the usage so
        # far on every chunk (candidatesTokenCount growing: tests/fixtures/providers/gemini/
        # stream_captured.sse), the whole usage on the last.
        c.streamed += piece
        chunk = self._chunk(req, c, piece, final=last)
        if not last:
            so_far = approx_tokens(c.streamed)
            usage = chunk["usageMetadata"]
            usage["candidatesTokenCount"] = so_far
            usage["totalTokenCount"] = c.prompt_tokens + so_far
            usage["promptTokensDetails"] = usage.pop("promptTokensDetails")  # the API's key order
        return sse(chunk).replace(b"\n\n", b"\r\n\r\n")

    def stream_tail(self, req: SimRequest, c: Completion) -> bytes:
        if c.text:
            return b""  # already sent with the last piece
        return sse(self._chunk(req, c, "", final=True)).replace(b"\n\n", b"\r\n\r\n")
