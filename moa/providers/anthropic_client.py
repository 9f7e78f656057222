"""Anthropic Messages API through ``anthropic.AsyncAnthropic``.

Tools go as the Messages API takes them: each function as a custom tool (``name``,
``description``, ``input_schema``, ``strict``), the choice as ``tool_choice`` (``auto``, ``any``,
``tool`` + ``name``, ``none``; ``disable_parallel_tool_use`` when one call at most is allowed). An
assistant turn's calls become ``tool_use`` blocks whose ``input`` is the arguments' JSON object,
and ``tool`` turns ``tool_result`` blocks, in the one user turn the API wants right after the
calls. Back, ``tool_use`` blocks are ``ToolCall``s and ``stop_reason: tool_use`` our
``tool_calls``; a stream's calls are assembled from their ``input_json_delta`` fragments as the
model wrote them.

Structured outputs go as the API's own (``output_config.format``: ``{"type": "json_schema",
"schema": ...}``), the schema fitted by the SDK's ``transform_schema`` as its ``messages.parse``
fits it: every object closed, the constraints Claude's decoding does not take moved into the
description (the engine validates the answer against the schema as asked, so none is lost); the
answer is the text block. The API has no JSON mode: a ``json_object`` format is a forced call of
one tool whose input is any object (``{"type": "object"}``), its input returned as the answer's
text (the closed objects ``output_config`` demands would allow only ``{}``). ``stop_reason:
"refusal"`` is a refusal.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import anthropic
from anthropic.types import Message

from moa.providers.sse import sse_events
from moa.providers.structured import schema_of
from moa.providers.transport import Attempt, AttemptError, SDKTransport, ToolFragment, refused_unsent
from moa.providers.wire import (
    classify_common,
    classify_generated_sdk,
    header_retry_hint,
    parse_reset_time,
    provider_service_time,
    refused_param,
    unexpected_failure,
)
from moa.types import (
    CallRequest,
    ChatMessage,
    ErrorKind,
    GenerationParams,
    ImagePart,
    ResponseFormat,
    ToolCall,
    ToolSet,
    ToolSpec,
    Usage,
)

# The Messages API requires max_tokens; used when the request does not say.
DEFAULT_MAX_TOKENS = 1024
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
# Our tool choice modes as the Messages API names them (a named function is ``tool``).
CHOICE = {"auto": "auto", "none": "none", "required": "any", "function": "tool"}
# Where a model's tool input was not JSON, the input object holds the text it wrote under this key
# (the key Anthropic's fine-grained tool streaming guide gives for passing such text back, and the
# simulator's way of answering malformed arguments without a stream).
INVALID_JSON = "INVALID_JSON"
# The tool a json_object answer is written through (the API has no JSON mode), forced, its input
# any object; it is never offered beside the request's own tools.
JSON_TOOL = "json_answer"
JSON_TOOL_SPEC = {
    "name": JSON_TOOL,
    "description": "Write the answer as a JSON object: the tool's input is the answer.",
    "input_schema": {"type": "object"},
}
# What a refusal is called when the model wrote no words for it.
REFUSED_WITHOUT_WORDS = "the model refused (stop_reason: refusal)"
# Anthropic's temperature range; ours (OpenAI's) goes to 2.
MAX_TEMPERATURE = 1.0
# How the API refuses a parameter: "`temperature` is deprecated for this model." (models that
# dropped it), or "seed: Extra inputs are not permitted." (a field it does not know).
REFUSED = re.compile(r"`(\w+)` is (?:deprecated|not supported)|(\w+): Extra inputs are not permitted")
NAMES = {"stop_sequences": "stop"}
# Anthropic's Rate limits page: a 429 carries ``retry-after`` (seconds), and every response the
# ``anthropic-ratelimit-*-remaining`` / ``-reset`` pair of each limit, the reset in RFC 3339.
RATE_LIMITS = {
    f"anthropic-ratelimit-{limit}-remaining": f"anthropic-ratelimit-{limit}-reset"
    for limit in ("requests", "tokens", "input-tokens", "output-tokens")
}


def retry_hint(headers: Mapping[str, str]) -> float | None:
    """Anthropic's wait: its ``retry-after``, else the reset of the spent limit."""
    return header_retry_hint(headers, RATE_LIMITS, parse_reset_time)


# OpenAI parameters the Messages API has no counterpart for: dropped, each with a note on the call.
_NO_SUCH_PARAM = {
    "frequency_penalty": "the Anthropic API has no frequency penalty",
    "presence_penalty": "the Anthropic API has no presence penalty",
    "logit_bias": "the Anthropic API has no logit bias (and other token ids)",
    "reasoning_effort": "Anthropic models take a thinking token budget instead, which this service "
    "does not set",
}


class AnthropicTransport(SDKTransport):
    kind = "anthropic"

    def _make_sdk(self) -> Any:
        cfg, endpoint = self.cfg, self.endpoint
        return anthropic.AsyncAnthropic(
            api_key=self._secret,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=anthropic.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            # The SDK opens its own anthropic.messages.create CLIENT span with gen_ai.* attributes
            # for each call; beside ours (moa_observability.genai) every call would count twice in
            # GenAI views. Ours carries what theirs does and is the one span per model call.
            open_telemetry=False,
            # aiohttp underneath, as for OpenAI.
            http_client=anthropic.DefaultAioHttpClient(),
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        system = "\n\n".join(m.content for m in req.messages if m.role == "system")
        args: dict[str, Any] = {
            "model": req.model,
            "messages": _turns(req.messages),
            "max_tokens": p.max_tokens or DEFAULT_MAX_TOKENS,
            # What is left of the call's deadline, with the configured connect timeout: a bare
            # number here would replace the client's Timeout, connect_timeout_s included.
            "timeout": anthropic.Timeout(timeout_s, connect=min(self.cfg.connect_timeout_s, timeout_s)),
        }
        if system:
            args["system"] = system
        # anthropic 2.x no longer models temperature or top_p in messages.create() (it raises
        # TypeError on them); the API still takes them, so they go as extra body fields.
        sampling = {"temperature": p.temperature, "top_p": p.top_p}
        extra = {k: v for k, v in sampling.items() if v is not None}
        if extra:
            args["extra_body"] = extra
        if p.stop:
            args["stop_sequences"] = list(p.stop)
        if req.tools is not None:
            args["tools"] = [_tool(t) for t in req.tools.tools]
            choice = _tool_choice(req.tools)
            if choice is not None:
                args["tool_choice"] = choice
        if req.response_format is not None:
            args |= _format_args(req.response_format, req.tools is not None)
        return args

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        update: dict[str, object] = {}
        notes: list[str] = []
        if params.seed is not None:
            update["seed"] = None
            notes.append("seed dropped: the Anthropic API has no seed")
        for name, value in _NO_SUCH_PARAM.items():
            if getattr(params, name) is not None:
                update[name] = None
                notes.append(f"{name} dropped: {value}")
        t = params.temperature
        if t is not None and t > MAX_TEMPERATURE:
            update["temperature"] = MAX_TEMPERATURE
            notes.append(f"temperature {t:g} clamped to {MAX_TEMPERATURE:.1f} (Anthropic's range is 0-1)")
        if t is not None and params.top_p is not None:
            # Claude's current models refuse the pair ("cannot both be specified"); the temperature
            # is what callers (and our plans) set on purpose.
            update["top_p"] = None
            notes.append(f"top_p dropped: {model} takes temperature or top_p, not both")
        return (params.model_copy(update=update) if update else params), notes

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, NAMES)

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        raw = await self._sdk.messages.with_raw_response.create(**self._args(req, timeout_s))
        service = provider_service_time(raw.headers)
        message = raw.parse()
        if inspect.isawaitable(message):  # the async client's parse() is a coroutine
            message = await message
        if not isinstance(message, Message):
            raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "response is not a message", service_s=service)
        text = "".join(block.text for block in message.content if block.type == "text")
        calls = [
            ToolCall(id=block.id, name=block.name, arguments=_arguments(block.input))
            for block in message.content
            if block.type == "tool_use"
        ]
        stop = message.stop_reason
        if _json_mode(req):  # the forced tool's input is the answer
            text = "".join(c.arguments for c in calls if c.name == JSON_TOOL)
            calls, stop = [], "end_turn" if stop == "tool_use" else stop
        return Attempt(
            text=text,
            model=message.model,
            usage=_usage(message.usage),
            finish_reason=_finish(stop, calls, service),
            service_s=service,
            tool_calls=calls,
            refusal=(text or REFUSED_WITHOUT_WORDS) if stop == "refusal" else None,
        )

    async def open_stream(
        self, req: CallRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolFragment | Attempt]:
        # The SDK's raw streaming response: the SDK builds and sends the request and raises its
        # typed status errors; each event is read as its JSON object (``_events``), not built into
        # a pydantic object (most of a streamed call's CPU, docs/BENCHMARKS.md). A field the
        # event lacks reads as None, as it does on the SDK's objects.
        opened = self._sdk.messages.with_streaming_response.create(**self._args(req, timeout_s), stream=True)
        async with opened as response, contextlib.aclosing(_events(response)) as events:
            service = provider_service_time(response.headers)
            model, usage, output_tokens, stop, finished = None, None, 0, None, False
            # Each tool_use block by its index: its id, name and the input's JSON fragments so far.
            calls: dict[int, tuple[str, str, list[str]]] = {}
            json_mode = _json_mode(req)
            answer: int | None = None  # json_object: the index of the forced tool's block
            written: list[str] = []  # the answer's text, for a refusal's words
            async for event in events:
                kind = event.get("type")
                if kind == "content_block_delta":  # nearly every event: read first
                    delta = _part(event, "delta", service)
                    delta_kind = delta.get("type")
                    if delta_kind == "text_delta":
                        text = delta.get("text")
                        if not isinstance(text, str):
                            raise _malformed(event, "text", service)
                        written.append(text)
                        yield text
                    elif delta_kind == "input_json_delta":
                        index, partial = event.get("index"), delta.get("partial_json")
                        if index == answer:
                            if partial:  # the answer itself, as the model writes it
                                written.append(partial)
                                yield partial
                            continue
                        call = calls.get(index)
                        if call is None:
                            raise AttemptError(
                                ErrorKind.MALFORMED_RESPONSE,
                                f"input_json_delta for block {index}, which is not a tool_use block",
                                service_s=service,
                            )
                        if partial:
                            call[2].append(partial)
                            yield ToolFragment(partial)
                elif kind == "message_start":
                    message = _part(event, "message", service)
                    model, usage = message.get("model"), _part(message, "usage", service)
                elif kind == "content_block_start":
                    block = _part(event, "content_block", service)
                    if block.get("type") != "tool_use":
                        continue
                    if json_mode and block.get("name") == JSON_TOOL:
                        answer = event.get("index")
                    else:
                        calls[event.get("index")] = (block.get("id"), block.get("name"), [])
                        yield ToolFragment(block.get("name"))
                elif kind == "message_delta":
                    stop = _part(event, "delta", service).get("stop_reason")
                    output_tokens = _part(event, "usage", service).get("output_tokens")
                elif kind == "message_stop":
                    finished = True
        if not finished:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended before message_stop", service_s=service
            )
        u = _usage(usage)
        u = u.model_copy(update={"output_tokens": output_tokens or u.output_tokens})
        # The arguments as the model wrote them: its fragments joined (a call without any took
        # no arguments: an empty object), never parsed or repaired here.
        assembled = [
            ToolCall(id=cid, name=name, arguments="".join(parts) or "{}")
            for _, (cid, name, parts) in sorted(calls.items())
        ]
        if answer is not None and stop == "tool_use":
            stop = "end_turn"  # the forced tool's input was the answer: a finished one
        yield Attempt(
            text="",
            model=model,
            usage=u,
            finish_reason=_finish(stop, assembled, service),
            service_s=service,
            tool_calls=assembled,
            refusal=("".join(written) or REFUSED_WITHOUT_WORDS) if stop == "refusal" else None,
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        if isinstance(exc, AssertionError):  # the SDK asserts on a non-JSON stream body
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "response failed validation")
        return (
            classify_generated_sdk(anthropic, exc, in_stream, retry_hint)
            or classify_common(exc, in_stream)
            or unexpected_failure(exc)
        )

    async def aclose(self) -> None:
        await self._sdk.close()


def _usage(u: Any) -> Usage:
    """Anthropic's input_tokens exclude cache reads and writes; ours count every input token.
    ``u``: a message's usage (the SDK's object), or a stream's (its JSON object)."""
    if u is None:
        return Usage()
    if isinstance(u, Mapping):
        cached = u.get("cache_read_input_tokens") or 0
        created = u.get("cache_creation_input_tokens") or 0
        return Usage(
            input_tokens=(u.get("input_tokens") or 0) + cached + created,
            output_tokens=u.get("output_tokens") or 0,
            cached_tokens=cached,
        )
    cached = getattr(u, "cache_read_input_tokens", None) or 0
    created = getattr(u, "cache_creation_input_tokens", None) or 0
    return Usage(
        input_tokens=(u.input_tokens or 0) + cached + created,
        output_tokens=u.output_tokens or 0,
        cached_tokens=cached,
    )


async def _events(response: Any) -> AsyncGenerator[Any, None]:
    """The events of a raw streamed message as their JSON objects, read as the SDK's own stream
    (``anthropic.AsyncStream``) reads them: ``ping`` events and events without a name skipped;
    an ``error`` event raises the status error the SDK raises for it (``APIStatusError``, the
    stream's status being a success, with the event's data as its body and in its message; a
    failure after the 200); an event without data skipped; data that is not JSON raises
    ``json.JSONDecodeError``. A broken connection raises what the HTTP client raised, as in the
    SDK, which wraps none of it in a stream."""
    async with contextlib.aclosing(sse_events(response.http_response.aiter_bytes())) as events:
        async for name, data in events:
            if name == "ping" or name is None:
                continue
            if name == "error":
                raise _stream_error(data, response.http_response)
            if not data:
                continue
            event = json.loads(data)
            if not isinstance(event, Mapping):
                raise AttemptError(
                    ErrorKind.MALFORMED_RESPONSE, f"a streamed {name} event that is not an object"
                )
            yield event


def _part(event: Mapping[str, Any], key: str, service: float | None) -> Any:
    """An event's object-valued field: one of another shape is the provider's malformed
    response, never a failure of ours (a field the event lacks reads as an empty object)."""
    value = event.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _malformed(event, key, service)
    return value


def _malformed(event: Mapping[str, Any], key: str, service: float | None) -> AttemptError:
    return AttemptError(
        ErrorKind.MALFORMED_RESPONSE,
        f"a {event.get('type')} event whose {key} is not what the API sends",
        service_s=service,
    )


def _stream_error(data: str, response: Any) -> anthropic.APIStatusError:
    """What the SDK raises for an ``error`` event after a successful status: its data parsed (or
    as it came when it is not JSON) as the body, and in the message."""
    body: object = data
    try:
        body = json.loads(data)
        message = f"{body}"
    except Exception:
        message = data or f"Error code: {response.status_code}"
    return anthropic.APIStatusError(message, response=response, body=body)


def _finish(stop_reason: str | None, calls: list[ToolCall], service: float | None) -> str:
    """Our finish reason; a ``tool_use`` stop with no call to show is a malformed answer, not
    an empty one."""
    if stop_reason == "tool_use" and not calls:
        raise AttemptError(
            ErrorKind.MALFORMED_RESPONSE, "stop_reason tool_use without a tool_use block", service_s=service
        )
    return FINISH.get(stop_reason or "", "other")


def _arguments(tool_input: object) -> str:
    """A tool_use block's input as the JSON text of its arguments. An input that only wraps
    the text the model wrote (``{"INVALID_JSON": "..."}``) gives that text back, unparsed, so
    the call is judged on what the model wrote rather than on the wrapper."""
    if isinstance(tool_input, dict) and tool_input.keys() == {INVALID_JSON}:
        written = tool_input[INVALID_JSON]
        if isinstance(written, str):
            return written
    return json.dumps(tool_input, ensure_ascii=False)


def _json_mode(req: CallRequest) -> bool:
    """Whether the answer is written through the forced JSON tool (a ``json_object`` format)."""
    return req.response_format is not None and req.response_format.type == "json_object"


def _format_args(fmt: ResponseFormat, has_tools: bool) -> dict[str, Any]:
    """What asks the Messages API for ``fmt``: ``output_config.format`` for a schema (fitted by
    the SDK's ``transform_schema``), the forced JSON tool for any object."""
    if fmt.type == "json_schema":
        try:
            schema = anthropic.transform_schema(schema_of(fmt))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise refused_unsent(
                f"response_format: a schema Anthropic's structured outputs cannot take ({exc})"
            ) from None
        return {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    if has_tools:
        raise refused_unsent(
            "response_format json_object with tools: the Anthropic API has no JSON mode, and the forced "
            "tool call that stands for one cannot sit beside the request's own tools (send a json_schema "
            "format, which the API takes with tools)"
        )
    return {"tools": [JSON_TOOL_SPEC], "tool_choice": {"type": "tool", "name": JSON_TOOL}}


def _tool(spec: ToolSpec) -> dict[str, Any]:
    """One function as a custom tool of the Messages API."""
    tool: dict[str, Any] = {"name": spec.name, "input_schema": spec.parameters}
    if spec.description is not None:
        tool["description"] = spec.description
    if spec.strict is not None:
        tool["strict"] = spec.strict
    return tool


def _tool_choice(tools: ToolSet) -> dict[str, Any] | None:
    """``tool_choice``, or None where the API's default (``auto``, parallel calls allowed) is
    what was asked. ``none`` takes no ``disable_parallel_tool_use`` (no call can come)."""
    mode = tools.choice.mode
    if mode == "auto" and tools.parallel:
        return None
    choice: dict[str, Any] = {"type": CHOICE[mode]}
    if mode == "function":
        if not tools.choice.name:
            raise refused_unsent("tool choice 'function' names no function")
        choice["name"] = tools.choice.name
    if mode != "none" and not tools.parallel:
        choice["disable_parallel_tool_use"] = True
    return choice


def _tool_use(call: ToolCall) -> dict[str, Any]:
    """An earlier call as a tool_use block: its input is the arguments' JSON object. Arguments
    that are not one cannot be sent as the model wrote them, and are refused, not rewritten."""
    try:
        tool_input = json.loads(call.arguments, parse_constant=_no_constant)
    except ValueError as exc:
        raise refused_unsent(
            f"tool call {call.id!r} ({call.name}) has arguments that are not JSON ({exc}); the Anthropic "
            "API takes a tool call's input as a JSON object"
        ) from None
    if not isinstance(tool_input, dict):
        raise refused_unsent(
            f"tool call {call.id!r} ({call.name}) has arguments that are not a JSON object; the Anthropic "
            "API takes a tool call's input as a JSON object"
        )
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _blocks(m: ChatMessage) -> tuple[str, list[dict[str, Any]]]:
    """One message as the role and content blocks it is sent as."""
    if m.role == "tool":
        if not m.tool_call_id:
            raise refused_unsent(
                "a tool message has no tool_call_id: the Anthropic API answers a call by its id"
            )
        return "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}]
    text = [{"type": "text", "text": m.content}] if m.content or not m.tool_calls else []
    # Images before the text, as Anthropic's vision guide advises (and its examples send them).
    return m.role, [_image(i) for i in m.images] + text + [_tool_use(c) for c in m.tool_calls]


def _image(image: ImagePart) -> dict[str, Any]:
    """An image as the Messages API's ``image`` block: a data URL's bytes as a ``base64`` source
    (with the media type read from its header), an https URL as a ``url`` source."""
    if image.is_data:
        source = {"type": "base64", "media_type": image.media_type, "data": image.base64}
    else:
        source = {"type": "url", "url": image.url}
    return {"type": "image", "source": source}


def _turns(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """The conversation as the Messages API wants it: user and assistant turns alternating (a
    run of one role is one turn, texts joined by a blank line), the results of a turn's calls
    together in the next user turn, before any text of it. A turn of text alone is sent as a
    string, as before tools."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        role, blocks = _blocks(m)
        if not turns or turns[-1]["role"] != role:
            turns.append({"role": role, "content": blocks})
            continue
        content: list[dict[str, Any]] = turns[-1]["content"]
        if blocks[0]["type"] == "tool_result" and content[-1]["type"] != "tool_result":
            raise refused_unsent(
                f"the result of tool call {m.tool_call_id!r} comes after a user message: the Anthropic "
                "API takes a call's results first in the user turn that follows it"
            )
        for block in blocks:
            if block["type"] == "text" and content[-1]["type"] == "text":
                content[-1] = {"type": "text", "text": content[-1]["text"] + "\n\n" + block["text"]}
            else:
                content.append(block)
    for turn in turns:
        blocks = turn["content"]
        if all(b["type"] == "text" for b in blocks):
            turn["content"] = blocks[0]["text"]  # a run of text turns is one text block by now
        else:  # the API refuses an empty text block beside others (an empty text adds nothing)
            turn["content"] = [b for b in blocks if b["type"] != "text" or b["text"]]
    return turns
