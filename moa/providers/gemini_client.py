"""Gemini through the ``google-genai`` SDK (the maintained successor of ``google-generativeai``).

Tool calling, both ways (``GeminiTransport`` says how each part maps and what is refused):
tools go out as function declarations whose ``parametersJsonSchema`` carries the request's JSON
Schema as it is, the choice as ``toolConfig.functionCallingConfig``, earlier calls as
``functionCall`` parts and tool results as ``functionResponse`` parts; the ``functionCall`` parts
of an answer come back as ``ToolCall``s, with an id made up where the model gave none.

Structured outputs: ``responseMimeType: "application/json"``, with the schema whole as
``responseJsonSchema`` (JSON Schema, not the OpenAPI subset of ``responseSchema``, for the reason
tools use ``parametersJsonSchema``) for a ``json_schema`` format, alone for ``json_object``. An
answer blocked for safety (finish reason ``SAFETY``, ``PROHIBITED_CONTENT``...: no content) is a
refusal, in the API's words, as is a prompt the API blocked (``promptFeedback.blockReason``, no
candidate): the provider did not fail, so it is neither retried nor held against its health.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from google import genai
from google.genai import errors, types

from moa.providers.structured import schema_of
from moa.providers.transport import Attempt, AttemptError, SDKTransport, ToolFragment, refused_unsent
from moa.providers.wire import (
    classify_common,
    parse_duration,
    provider_service_time,
    refused_param,
    status_error,
    unexpected_failure,
)
from moa.types import (
    CallRequest,
    ChatMessage,
    ErrorKind,
    GenerationParams,
    ImagePart,
    ToolCall,
    ToolSet,
    ToolSpec,
    Usage,
)

FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
}
# Finish reasons that say the answer was blocked, not written: a refusal (``CallResult.refusal``).
BLOCKED = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY"})
# The Gemini API takes at most this many stop sequences.
MAX_STOP = 5
# How the API refuses a field: 'Invalid JSON payload received. Unknown name "seed" at
# 'generation_config': Cannot find field.', or names a feature a model lacks ("... is not enabled
# for models/...").
REFUSED = re.compile(r'Unknown name "(\w+)"|(\w+) is not (?:enabled|supported) for')
NAMES = {
    "topP": "top_p",
    "stopSequences": "stop",
    "stop_sequences": "stop",
    "presencePenalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty",
}
# OpenAI parameters generateContent has no counterpart for: dropped, each with a note on the call.
_NO_SUCH_PARAM = {
    "logit_bias": "the Gemini API has no logit bias (and other token ids)",
    "reasoning_effort": "Gemini models take a thinking token budget instead, which this service does not set",
}
# The API refuses a wrong key with 400 INVALID_ARGUMENT, not 401; its ErrorInfo reason says why.
AUTH_REASONS = frozenset({"API_KEY_INVALID"})
# The wait a refusal asks for: Gemini sends no Retry-After header; it puts a ``google.rpc.RetryInfo``
# in the error body's details, its ``retryDelay`` a protobuf duration ("53s").
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
# The function names the API takes: a letter or an underscore first, then letters, digits,
# underscores, dots, colons and dashes, 64 at most. Others (OpenAI allows a leading digit or dash)
# are refused here, by name, rather than by the API's 400 about "function_declarations[3]".
FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")
# The ids this adapter makes up for calls the model gave none (Gemini before 3 numbers no call).
# Gemini never saw them, so they are not sent back: a call and its response pair by name and order.
GENERATED_ID = re.compile(r"^call_[0-9a-f]{32}$")
# Finish reasons that say the model's function call broke the request's contract: the answer
# carries no call and no text, so it is refused as INVALID_OUTPUT (the engine asks the next model)
# rather than passed on as an empty answer. The API's finishMessage would name the call, but the
# SDK does not keep it (Gemini Developer API mode), so the reason is said in its documented sense.
BAD_CALL = {
    "MALFORMED_FUNCTION_CALL": "the model wrote a function call the API could not parse",
    "UNEXPECTED_TOOL_CALL": "the model called a function that is not declared or not allowed",
}
CHOICE_MODES = {
    "auto": types.FunctionCallingConfigMode.AUTO,
    "none": types.FunctionCallingConfigMode.NONE,
    "required": types.FunctionCallingConfigMode.ANY,
    "function": types.FunctionCallingConfigMode.ANY,  # with allowedFunctionNames: [the one named]
}


class GeminiTransport(SDKTransport):
    """The Gemini API (``generateContent``), tools included.

    - Tools: one ``Tool`` with a ``FunctionDeclaration`` per tool, its JSON Schema sent whole as
      ``parametersJsonSchema`` (a free JSON value on the wire), not as ``parameters``: that field
      is Gemini's ``Schema`` message, an OpenAPI subset with no field for ``const``, ``oneOf``,
      ``allOf``, ``not``, ``uniqueItems``, ``multipleOf``... (the API refuses an unknown one:
      "Unknown name"), so a schema sent there would have to lose what it says. The model may not
      honour every keyword; the engine validates every final call against the whole schema, so
      none is lost. The API takes only an object
      schema (a call's ``args`` is an object), so any other is refused, as is a name outside
      Gemini's pattern. ``strict`` has no counterpart in a declaration: it is not sent, and the
      engine's validation holds the arguments to the schema, as strict decoding would.
    - Choice: auto → AUTO, none → NONE, required → ANY, a named function → ANY with
      ``allowedFunctionNames`` [that name]. ``parallel=False`` cannot be said: the API has no
      switch for it, so the request goes as it is and every call the model returns is kept (the
      engine checks the count of calls of the final answer).
    - History: an assistant turn with calls is a ``model`` content (its text, if any, then one
      ``functionCall`` per call, ``args`` the call's arguments parsed: they must be a JSON object);
      consecutive ``tool`` turns are one ``user`` content of ``functionResponse`` parts, each named
      after the function it answers (``ChatMessage.name``, else the earlier call with its id), its
      ``response`` the result when it is a JSON object, else ``{"output": <the text>}`` (the key
      the API's ``FunctionResponse`` documents for a function's output). Ids go back with both
      only when they are not ones this adapter made up (Gemini 3's, or another provider's).
    - Answers: each ``functionCall`` part is a ``ToolCall`` (its id, or ``call_<hex>`` made up,
      its ``args`` as compact JSON text) and the finish reason is ``tool_calls`` (Gemini says
      STOP). A stream carries each call whole in one chunk: a ``ToolFragment`` of its name and
      arguments (billed if the stream is cut), the calls in the final ``Attempt``. A call the API
      itself could not parse (MALFORMED_FUNCTION_CALL) or that the model may not make
      (UNEXPECTED_TOOL_CALL) comes with neither call nor text: INVALID_OUTPUT, in its words.

    Anything that cannot be sent is refused before sending, as the API would refuse it (400,
    BAD_REQUEST, nothing read or billed), naming the tool or call and why.
    """

    kind = "gemini"

    def _make_sdk(self) -> Any:
        cfg, endpoint = self.cfg, self.endpoint
        return genai.Client(
            # The SDK refuses to build without a key; with none, calls fail as auth before sending.
            api_key=self._secret or "unset",
            http_options=types.HttpOptions(
                base_url=endpoint.base_url,
                api_version="v1beta",
                timeout=int(cfg.timeout_s * 1000),
                # One attempt: without this the async transport retries connection errors itself.
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    def _args(self, req: CallRequest, timeout_s: float) -> dict[str, Any]:
        p = req.params
        system = "\n\n".join(m.content for m in req.messages if m.role == "system")
        tools, tool_config = _tools(req.tools) if req.tools is not None else (None, None)
        fmt = req.response_format
        config = types.GenerateContentConfig(
            response_mime_type="application/json" if fmt is not None else None,
            response_json_schema=schema_of(fmt) if fmt is not None and fmt.type == "json_schema" else None,
            system_instruction=system or None,
            temperature=p.temperature,
            top_p=p.top_p,
            max_output_tokens=p.max_tokens,
            seed=p.seed,
            stop_sequences=list(p.stop) if p.stop else None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            tools=tools,
            tool_config=tool_config,
            http_options=types.HttpOptions(
                timeout=max(int(timeout_s * 1000), 1), retry_options=types.HttpRetryOptions(attempts=1)
            ),
        )
        return {"model": req.model, "contents": _contents(req.messages), "config": config}

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        update: dict[str, object] = {}
        notes: list[str] = []
        stop = params.stop
        if stop and len(stop) > MAX_STOP:
            update["stop"] = stop[:MAX_STOP]
            notes.append(f"stop: kept the first {MAX_STOP} of {len(stop)} sequences (the Gemini API's limit)")
        for name, why in _NO_SUCH_PARAM.items():
            if getattr(params, name) is not None:
                update[name] = None
                notes.append(f"{name} dropped: {why}")
        return (params.model_copy(update=update) if update else params), notes

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, NAMES)

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        response = await self._sdk.aio.models.generate_content(**self._args(req, timeout_s))
        service = _service(response)
        refused_prompt = _prompt_blocked(response)
        if refused_prompt is not None and not response.candidates:
            return Attempt(
                text="",
                model=response.model_version,
                usage=_usage(response.usage_metadata),
                finish_reason="content_filter",
                service_s=service,
                refusal=refused_prompt,
            )
        if not response.candidates:
            raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "response has no candidates", service_s=service)
        candidate = response.candidates[0]
        _check_call(candidate, service)
        calls = [_tool_call(c) for c in _function_calls(response)]
        return Attempt(
            text=_text(response),
            model=response.model_version,
            usage=_usage(response.usage_metadata),
            finish_reason="tool_calls" if calls else _finish(candidate.finish_reason),
            service_s=service,
            tool_calls=calls,
            refusal=_blocked(candidate),
        )

    async def open_stream(
        self, req: CallRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolFragment | Attempt]:
        stream = await self._sdk.aio.models.generate_content_stream(**self._args(req, timeout_s))
        service, finish, model, usage = None, None, None, None
        calls: list[ToolCall] = []
        refusal: str | None = None
        async with contextlib.aclosing(_read(stream)) as chunks:
            async for chunk in chunks:
                service = service if service is not None else _service(chunk)
                model = chunk.model_version or model
                usage = chunk.usage_metadata or usage
                text = _text(chunk)
                if text:
                    yield text
                # Each call comes whole in one chunk (the Gemini API does not stream a call's
                # arguments): its id is made now, once, and its text is what a cut stream is billed for.
                for part in _function_calls(chunk):
                    call = _tool_call(part)
                    calls.append(call)
                    yield ToolFragment(call.name + call.arguments)
                if chunk.candidates and chunk.candidates[0].finish_reason:
                    _check_call(chunk.candidates[0], service)
                    finish = chunk.candidates[0].finish_reason
                    refusal = _blocked(chunk.candidates[0])
                elif not chunk.candidates and _prompt_blocked(chunk) is not None:
                    finish, refusal = "SAFETY", _prompt_blocked(chunk)
        if finish is None:
            raise AttemptError(
                ErrorKind.MALFORMED_RESPONSE, "stream ended without a finish reason", service_s=service
            )
        yield Attempt(
            text="",
            model=model,
            usage=_usage(usage),
            finish_reason="tool_calls" if calls else _finish(finish),
            service_s=service,
            tool_calls=calls,
            refusal=refusal,
        )

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        if isinstance(exc, errors.UnknownApiResponseError):
            return AttemptError(ErrorKind.MALFORMED_RESPONSE, "unparseable response")
        if isinstance(exc, errors.APIError):
            headers: Mapping[str, str] | None = getattr(exc.response, "headers", None)
            message = f"{exc.code}: {exc.message or exc.status}"
            err = status_error(exc.code, message, headers, retry_delay(exc.details))
            if _reasons(exc.details) & AUTH_REASONS:
                err.kind = ErrorKind.AUTH
            return err
        return classify_common(exc, in_stream) or unexpected_failure(exc)

    async def aclose(self) -> None:
        await self._sdk.aio.aclose()


def _details(body: Any) -> list[dict[str, Any]]:
    """The ``details`` of an error body (AIP-193), each a typed ``google.rpc`` message."""
    error = body.get("error", body) if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _reasons(body: Any) -> set[str]:
    """The ``google.rpc.ErrorInfo`` reasons in an error body's details."""
    return {d["reason"] for d in _details(body) if isinstance(d.get("reason"), str)}


def retry_delay(body: Any) -> float | None:
    """The seconds a ``google.rpc.RetryInfo`` in the error body asks to wait, if it has one."""
    for d in _details(body):
        if d.get("@type") == RETRY_INFO:
            delay = d.get("retryDelay")
            return parse_duration(delay) if isinstance(delay, str) else None
    return None


def _text(response: types.GenerateContentResponse) -> str:
    if not response.candidates or not response.candidates[0].content:
        return ""
    return "".join(part.text or "" for part in response.candidates[0].content.parts or [] if not part.thought)


def _blocked(candidate: types.Candidate) -> str | None:
    """The refusal of a candidate blocked rather than written, in the API's words: its finish
    reason, message and the safety categories that blocked it; None for one written."""
    reason = getattr(candidate.finish_reason, "name", None) or str(candidate.finish_reason or "")
    if reason not in BLOCKED:
        return None
    blocked = [
        getattr(r.category, "name", None) or str(r.category)
        for r in candidate.safety_ratings or ()
        if r.blocked
    ]
    said = f"the answer was blocked (finishReason {reason}"
    said += f": {', '.join(blocked)})" if blocked else ")"
    return said + (f": {candidate.finish_message}" if candidate.finish_message else "")


def _prompt_blocked(response: types.GenerateContentResponse) -> str | None:
    """The refusal of a prompt the API blocked before any candidate was written
    (``promptFeedback.blockReason``, no candidates), in its words; None otherwise."""
    feedback = response.prompt_feedback
    if feedback is None or feedback.block_reason is None:
        return None
    reason = getattr(feedback.block_reason, "name", None) or str(feedback.block_reason)
    said = f"the prompt was blocked (promptFeedback.blockReason {reason})"
    return said + (f": {feedback.block_reason_message}" if feedback.block_reason_message else "")


def _finish(reason: Any) -> str:
    name = getattr(reason, "name", None) or str(reason or "")
    return FINISH.get(name, "other")


async def _read(stream: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """The SDK's stream, closed when its reader stops (so that a cut call's connection closes
    now), with the SDK's own failure to read a chunk typed: google-genai's parsing code meets a
    streamed body that is not the API's (data that is not an object, candidates that are not a
    list) with a TypeError, AttributeError or KeyError of its own. That is the provider's
    malformed response, not a failure of ours; what the adapter itself raises on a chunk stays
    ours, since only the SDK's reading is inside this wrapper."""
    chunks = aiter(stream)
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except (TypeError, AttributeError, KeyError) as exc:
                raise AttemptError(
                    ErrorKind.MALFORMED_RESPONSE,
                    f"a streamed response the SDK cannot read ({type(exc).__name__})",
                ) from exc
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _service(response: types.GenerateContentResponse) -> float | None:
    http = response.sdk_http_response
    return provider_service_time(http.headers) if http is not None else None


def _usage(u: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    if u is None:
        return Usage()
    return Usage(
        input_tokens=u.prompt_token_count or 0,
        output_tokens=u.candidates_token_count or 0,
        cached_tokens=u.cached_content_token_count or 0,
    )


# -- tools ---------------------------------------------------------------------------------------------


def _tools(tools: ToolSet) -> tuple[types.ToolListUnion | None, types.ToolConfig | None]:
    """The request's tools as one ``Tool`` of function declarations, and its choice."""
    choice = tools.choice
    if not tools.tools:
        if choice.mode in ("required", "function"):
            raise refused_unsent(f"tool choice {choice.mode!r} with no tools declared: nothing to call")
        return None, None
    declarations = [_declaration(spec) for spec in tools.tools]
    allowed = None
    if choice.mode == "function":
        if choice.name is None or tools.spec(choice.name) is None:
            raise refused_unsent(f"tool choice names function {choice.name!r}, which is not among the tools")
        allowed = [choice.name]
    calling = types.FunctionCallingConfig(mode=CHOICE_MODES[choice.mode], allowed_function_names=allowed)
    return [types.Tool(function_declarations=declarations)], types.ToolConfig(function_calling_config=calling)


def _declaration(spec: ToolSpec) -> types.FunctionDeclaration:
    """One tool as a function declaration, its schema whole in ``parametersJsonSchema``."""
    if not FUNCTION_NAME.match(spec.name):
        raise refused_unsent(
            f"tool {spec.name!r}: not a Gemini function name (a letter or an underscore first, then "
            "letters, digits, underscores, dots, colons or dashes, 64 characters at most)"
        )
    kind = spec.parameters.get("type")
    if kind != "object":
        raise refused_unsent(
            f'tool {spec.name!r}: its parameters must be a JSON Schema of type "object" (Gemini '
            f"passes a call's arguments as an object), not of type {kind!r}"
        )
    return types.FunctionDeclaration(
        name=spec.name, description=spec.description, parameters_json_schema=spec.parameters
    )


def _contents(messages: Sequence[ChatMessage]) -> list[types.Content]:
    """The conversation (system turns aside) as Gemini contents, calls and results included:
    consecutive tool results are one content, as the API wants every response to a turn's calls
    in the one turn after it."""
    turns: list[tuple[str, list[types.Part]]] = []
    called: dict[str, str] = {}  # the function each earlier call (by id) called
    previous = None
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "tool":
            part = types.Part(function_response=_function_response(m, called))
            if previous == "tool":
                turns[-1][1].append(part)
            else:
                turns.append(("user", [part]))
        elif m.role == "assistant":
            parts = [types.Part(text=m.content)] if m.content or not m.tool_calls else []
            for call in m.tool_calls:
                called[call.id] = call.name
                parts.append(types.Part(function_call=_function_call(call)))
            turns.append(("model", parts))
        else:
            text = [types.Part(text=m.content)] if m.content or not m.images else []
            turns.append(("user", [*text, *(_inline(i) for i in m.images)]))
        previous = m.role
    return [types.Content(role=role, parts=parts) for role, parts in turns]


def _inline(image: ImagePart) -> types.Part:
    """An image as Gemini's ``inlineData`` (its bytes and media type). Gemini's API takes no image
    URL (only inline data or uploaded files), and the service fetches none: a plan never sends
    one here (``moa.engine.vision``), so one that comes is refused unsent."""
    if not image.is_data:
        raise refused_unsent("Gemini's API takes images as inline data, not by URL: the image was not sent")
    return types.Part(inline_data=types.Blob(mime_type=image.media_type, data=image.data))


def _function_call(call: ToolCall) -> types.FunctionCall:
    """An earlier call as the model's ``functionCall``: Gemini takes its arguments as an object."""
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise refused_unsent(
            f"tool call {call.id!r} ({call.name}): its arguments are not a JSON object, and Gemini "
            f"takes a call's arguments only as an object: {call.arguments[:200]!r}"
        )
    return types.FunctionCall(id=_sent_id(call.id), name=call.name, args=args)


def _function_response(m: ChatMessage, called: Mapping[str, str]) -> types.FunctionResponse:
    """A tool result as a ``functionResponse``, named after the function it answers."""
    made = called.get(m.tool_call_id) if m.tool_call_id is not None else None
    name = m.name or made
    if not name:
        raise refused_unsent(
            f"tool result for call {m.tool_call_id!r}: Gemini needs the name of the function it "
            "answers, and neither the message nor an earlier call gives it"
        )
    if made is not None and made != name:
        raise refused_unsent(
            f"tool result for call {m.tool_call_id!r} names function {name!r}, but that call was to {made!r}"
        )
    try:
        value = json.loads(m.content)
    except ValueError:
        value = None
    response = value if isinstance(value, dict) else {"output": m.content}
    return types.FunctionResponse(id=_sent_id(m.tool_call_id), name=name, response=response)


def _sent_id(call_id: str | None) -> str | None:
    """The id to send with a call or its result: none for the ids this adapter made up."""
    return None if call_id is None or GENERATED_ID.match(call_id) else call_id


def _function_calls(response: types.GenerateContentResponse) -> Iterable[types.FunctionCall]:
    """The function calls of the first candidate, in order."""
    if not response.candidates or not response.candidates[0].content:
        return []
    return [p.function_call for p in response.candidates[0].content.parts or [] if p.function_call]


def _check_call(candidate: types.Candidate, service: float | None) -> None:
    """Raise INVALID_OUTPUT if the candidate ended on a function call the API refused."""
    reason = getattr(candidate.finish_reason, "name", None) or str(candidate.finish_reason or "")
    if reason in BAD_CALL:
        said = candidate.finish_message or BAD_CALL[reason]
        raise AttemptError(ErrorKind.INVALID_OUTPUT, f"{reason}: {said}", service_s=service)


def _tool_call(call: types.FunctionCall) -> ToolCall:
    """A ``functionCall`` as a ``ToolCall``: its id, or one made up (``call_<uuid hex>``, unique),
    and its ``args`` as compact JSON text (the API returns an object, not the text the model
    wrote; compact is how models write it, and how its stream is billed)."""
    if not call.name:
        raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "a functionCall part without a name")
    arguments = json.dumps(call.args or {}, separators=(",", ":"), ensure_ascii=False)
    return ToolCall(id=call.id or f"call_{uuid.uuid4().hex}", name=call.name, arguments=arguments)
