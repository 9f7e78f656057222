"""Request and response bodies of the OpenAI-compatible API, plus the ``moa`` extension."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from moa.api.images import image_part
from moa.engine.toolcalls import ToolMode, schema_problem
from moa.plan import AggregationMode, Plan
from moa.types import (
    OPENAI_CHAT_FIELDS,
    ChatMessage,
    GenerationParams,
    ImagePart,
    ReasoningEffort,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSet,
    ToolSpec,
    check_logit_bias,
)


class ParamError(ValueError):
    """A validation failure that knows which request field is at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    # An ``image_url`` part's object (``url``, ``detail``), checked by ``moa.api.images``.
    image_url: Any = None


class InFunctionCall(BaseModel):
    """A call as an assistant message carries it (``tool_calls[].function``, or the legacy
    ``function_call``): the arguments are the JSON text the model wrote."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    arguments: str = "{}"


class InToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: InFunctionCall


class InMessage(BaseModel):
    """A chat message as OpenAI clients send it: content may be a string or a list of parts; an
    assistant message may carry its ``tool_calls`` (or the legacy ``function_call``); a ``tool``
    message answers one call (``tool_call_id``), a legacy ``function`` message the last
    ``function_call``."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[InToolCall] | None = None
    tool_call_id: str | None = None
    function_call: InFunctionCall | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            allowed = {"text", "image_url"} if self.role == "user" else {"text"}
            kinds = {p.type for p in self.content} - allowed
            if kinds:
                where = "" if self.role == "user" else f" in a {self.role} message"
                raise ValueError(
                    f"only text and image_url content is supported{where}, not {', '.join(sorted(kinds))}"
                )
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def images(self) -> tuple[ImagePart, ...]:
        """The ``image_url`` parts of a user message (``moa.api.images`` checks each)."""
        if not isinstance(self.content, list):
            return ()
        return tuple(image_part(p.image_url) for p in self.content if p.type == "image_url")

    def to_chat(self) -> ChatMessage:
        text = self.text()
        if self.role == "assistant" and (self.tool_calls or self.function_call):
            calls = [
                ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                for c in self.tool_calls or ()
            ]
            if self.function_call is not None:
                fc = self.function_call
                calls.append(ToolCall(id=LEGACY_CALL_ID, name=fc.name, arguments=fc.arguments))
            return ChatMessage(role="assistant", content=text, tool_calls=tuple(calls))
        if self.role in ("tool", "function"):
            call_id = self.tool_call_id if self.role == "tool" else LEGACY_CALL_ID
            return ChatMessage(role="tool", content=text, tool_call_id=call_id, name=self.name)
        if self.role == "function":  # a function result without a call before it: refused above
            raise ValueError("a function message must answer a function_call")
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text, images=self.images())


# The id a legacy ``function_call`` (which has none) goes by inside the service, so that the
# ``function`` message answering it is matched like any tool result.
LEGACY_CALL_ID = "call_legacy_function"


def chat_messages(messages: list[InMessage]) -> list[ChatMessage]:
    """The one rule both endpoints apply to a message list: text content (and images in user
    messages), at least one user message, and tool turns as OpenAI's API holds them (each
    ``tool`` message answers a call of the assistant message before it; every call is answered
    before the conversation goes on).
    Raises ``ParamError`` naming the field at fault."""
    out: list[ChatMessage] = []
    pending: dict[str, str] = {}  # call id -> function name, of the last assistant turn's calls
    for i, m in enumerate(messages):
        try:
            msg = m.to_chat()
        except ValueError as e:
            raise ParamError(str(e), f"messages.{i}.content") from None
        if msg.role == "tool":
            if m.role == "tool" and not m.tool_call_id:
                raise ParamError(
                    "a message with role 'tool' needs a tool_call_id", f"messages.{i}.tool_call_id"
                )
            if msg.tool_call_id not in pending:
                raise ParamError(
                    f"Invalid parameter: messages with role '{m.role}' must be a response to a preceding "
                    "message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            msg = msg.model_copy(update={"name": pending.pop(msg.tool_call_id or "")})
        elif pending:
            raise ParamError(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to "
                f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                f"{', '.join(pending)}",
                f"messages.[{i}].role",
            )
        if msg.tool_calls:
            pending = {c.id: c.name for c in msg.tool_calls}
        out.append(msg)
    if not any(m.role == "user" for m in out):
        raise ParamError("messages must contain a user message", "messages")
    return out


# OpenAI's rule for a function's name, and its limit on tools per request.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128


class InFunction(BaseModel):
    """A function tool's declaration (``tools[].function``, or a legacy ``functions`` item)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def spec(self) -> ToolSpec:
        params = self.parameters if self.parameters is not None else {"type": "object", "properties": {}}
        return ToolSpec(name=self.name, description=self.description, parameters=params, strict=self.strict)


class InTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    function: InFunction | None = None


def tool_set(
    tools: list[InTool] | None,
    choice: Any,
    parallel: bool | None,
    functions: list[InFunction] | None = None,
    function_call: Any = None,
) -> ToolSet | None:
    """The request's tools as the engine runs them, validated as OpenAI's API validates them (and
    each schema checked as a JSON Schema, since every call is validated against it); the legacy
    ``functions``/``function_call`` mapped onto them. None without tools."""
    if functions is not None:
        if tools is not None:
            raise ParamError("give either tools or the legacy functions, not both", "functions")
        if parallel is not None:
            raise ParamError("parallel_tool_calls is only allowed with tools", "parallel_tool_calls")
        specs = _specs([f.spec() for f in functions], "functions")
        return ToolSet(tools=specs, choice=_legacy_choice(function_call, specs), parallel=False, legacy=True)
    if function_call is not None:
        raise ParamError(
            "Invalid value for 'function_call': it is only allowed when 'functions' are specified.",
            "function_call",
        )
    if tools is None:
        for name, value in (("tool_choice", choice), ("parallel_tool_calls", parallel)):
            if value is not None:
                raise ParamError(
                    f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.", name
                )
        return None
    found = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise ParamError(
                f"tool type {tool.type!r} is not supported by this service: only function tools",
                f"tools.{i}.type",
            )
        if tool.function is None:
            raise ParamError(f"Missing required parameter: 'tools[{i}].function'.", f"tools.{i}.function")
        found.append(tool.function.spec())
    specs = _specs(found, "tools")
    return ToolSet(tools=specs, choice=_choice(choice, specs), parallel=parallel is not False)


def _specs(specs: list[ToolSpec], field: str) -> tuple[ToolSpec, ...]:
    if not specs:
        raise ParamError(f"[] is too short - '{field}'", field)
    if len(specs) > MAX_TOOLS:
        raise ParamError(f"at most {MAX_TOOLS} {field} may be given, not {len(specs)}", field)
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{field}.{i}.function" if field == "tools" else f"{field}.{i}"
        if spec.name in seen:
            raise ParamError(f"the function name {spec.name!r} is declared twice", f"{where}.name")
        seen.add(spec.name)
        problem = schema_problem(spec.parameters)
        if problem is not None:
            raise ParamError(f"Invalid schema for function '{spec.name}': {problem}", f"{where}.parameters")
    return tuple(specs)


def _choice(choice: Any, specs: tuple[ToolSpec, ...]) -> ToolChoice:
    if choice is None:
        return ToolChoice()
    if choice in ("auto", "none", "required"):
        return ToolChoice(mode=choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        return _named(name, specs, "tool_choice")
    raise ParamError(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def _legacy_choice(choice: Any, specs: tuple[ToolSpec, ...]) -> ToolChoice:
    if choice is None or choice in ("auto", "none"):
        return ToolChoice(mode=choice or "auto")
    if isinstance(choice, dict):
        return _named(choice.get("name"), specs, "function_call")
    raise ParamError(
        "Invalid value for 'function_call': expected 'none', 'auto' or {'name': ...}", "function_call"
    )


def _named(name: Any, specs: tuple[ToolSpec, ...], param: str) -> ToolChoice:
    if not isinstance(name, str) or not any(s.name == name for s in specs):
        declared = ", ".join(s.name for s in specs)
        raise ParamError(
            f"Invalid value for '{param}': function {name!r} is not declared (declared: {declared})", param
        )
    return ToolChoice(mode="function", name=name)


# The fields of a ``json_schema`` response format (OpenAI's); its name follows FUNCTION_NAME.
FORMAT_KEYS = frozenset({"name", "schema", "strict", "description"})


def response_format(value: Any) -> ResponseFormat | None:
    """The request's ``response_format`` as the engine runs it (None: ``text``, free text),
    checked as OpenAI's API checks it, and its schema as a JSON Schema, since every answer is
    validated against it. Raises ``ParamError`` naming the field at fault."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ParamError("Invalid type for 'response_format': expected an object.", "response_format")
    kind = value.get("type")
    extra = sorted(set(value) - {"type", "json_schema"})
    if kind not in ("text", "json_object", "json_schema"):
        raise ParamError(
            f"Invalid value: {kind!r}. Supported values are: 'text', 'json_object', and 'json_schema'.",
            "response_format.type",
        )
    if extra or (kind != "json_schema" and "json_schema" in value):
        name = extra[0] if extra else "json_schema"
        raise ParamError(f"Unrecognized parameter: 'response_format.{name}'.", f"response_format.{name}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    return _json_schema(value.get("json_schema"))


def _json_schema(spec: Any) -> ResponseFormat:
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ParamError(f"Missing required parameter: '{where}'.", where)
    unknown = sorted(set(spec) - FORMAT_KEYS)
    if unknown:
        raise ParamError(f"Unrecognized parameter: '{where}.{unknown[0]}'.", f"{where}.{unknown[0]}")
    name = spec.get("name")
    if name is None:
        raise ParamError(f"Missing required parameter: '{where}.name'.", f"{where}.name")
    if not isinstance(name, str) or not re.fullmatch(FUNCTION_NAME, name):
        raise ParamError(
            f"Invalid '{where}.name': string does not match pattern. Expected a string that matches "
            f"the pattern '{FUNCTION_NAME}'.",
            f"{where}.name",
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        # OpenAI's API takes a format without a schema; this service validates every answer
        # against one, so it asks for it rather than promise a document it cannot check.
        raise ParamError(
            f"'{where}.schema' must be a JSON Schema object: the answer is validated against it",
            f"{where}.schema",
        )
    problem = schema_problem(schema)
    if problem is not None:
        raise ParamError(f"Invalid schema for response_format '{name}': {problem}", f"{where}.schema")
    strict, about = spec.get("strict"), spec.get("description")
    if strict is not None and not isinstance(strict, bool):
        raise ParamError(f"Invalid type for '{where}.strict': expected a boolean.", f"{where}.strict")
    if about is not None and not isinstance(about, str):
        raise ParamError(
            f"Invalid type for '{where}.description': expected a string.", f"{where}.description"
        )
    return ResponseFormat(type="json_schema", name=name, schema=schema, strict=strict, description=about)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class MoAOptions(BaseModel):
    """The opt-in ``moa`` extension of a chat completion request. Strict: it is ours, so there is
    no client habit to forgive, and ``"detail": "yes"`` is a mistake worth a 422."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    detail: bool = False
    deadline_s: float | None = Field(default=None, gt=0, le=3600)
    # The most this request may cost (USD, worst case); ``auto`` picks a cheaper tier to fit it.
    max_cost_usd: float | None = Field(default=None, gt=0)
    # A stream reports where the proposer layers stand, in chunks with no choices (moa.progress).
    progress: bool = False
    # Overrides the plan's aggregation mode (final or early) for this request.
    aggregation: AggregationMode | None = None
    # The response cache: default (read and write), no-cache (do not read), no-store (do not
    # write), off (neither).
    cache: Literal["default", "no-cache", "no-store", "off"] = "default"
    # Also serve a rephrased question's answer (same context, similarity above the threshold).
    cache_semantic: bool = False
    # Allow a cached answer although temperature > 0 and no seed ask for a fresh sample.
    cache_sampled: bool = False
    # How a request with tools gets its final calls (the plan's ``tools`` by default).
    tools: ToolMode | None = None

    @property
    def tool_mode(self) -> ToolMode | None:
        return self.tools


class UnknownParameter(ParamError):
    """A request field OpenAI's API does not have (a misspelt ``temprature``): refused with a 400,
    as OpenAI refuses it, rather than ignored while the request runs with the default."""


# Every top-level field of OpenAI's chat completions request (moa.types.OPENAI_CHAT_FIELDS). Anything
# else (but this service's ``moa`` extension) is refused by name.
OPENAI_FIELDS = OPENAI_CHAT_FIELDS
# OpenAI's parameters this service does not implement: each is refused, naming it, unless it holds
# a value that asks for nothing (its default), so a client that always sends ``logprobs: false``
# still works. Value: the values accepted, and why anything else is refused.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": (
        (None, False),
        "an answer fused from several models' answers has no token log probabilities of its own",
    ),
    "top_logprobs": ((None,), "it needs logprobs, which this service does not return"),
    "audio": ((None,), "answers are text only"),
    "modalities": ((None, ["text"]), "answers are text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "this service stores no completions for later retrieval"),
    "metadata": ((None, {}), "it tags stored completions, and this service stores none"),
    "service_tier": ((None, "auto", "default"), "processing tiers are not offered"),
    "verbosity": ((None,), "answer verbosity is not supported; ask for it in the prompt"),
    "prompt_cache_key": ((None,), "the providers' prompt caches are not steered by the client"),
    "prompt_cache_retention": ((None,), "the providers' prompt caches are not steered by the client"),
    "prompt_cache_options": ((None,), "the providers' prompt caches are not steered by the client"),
    "moderation": ((None,), "moderation is not offered"),
}


class RunFields(Protocol):
    """The run's options both endpoints take (``MoAOptions`` on a chat completion, the top level
    of ``/v1/moa``): its deadline, cost cap, aggregation override and cache rights."""

    @property
    def deadline_s(self) -> float | None: ...
    @property
    def max_cost_usd(self) -> float | None: ...
    @property
    def aggregation(self) -> AggregationMode | None: ...
    @property
    def cache(self) -> str: ...
    @property
    def cache_semantic(self) -> bool: ...
    @property
    def cache_sampled(self) -> bool: ...
    @property
    def tool_mode(self) -> ToolMode | None: ...


@dataclass(frozen=True)
class RunSpec:
    """What a request body asks the engine for, the same for both endpoints."""

    options: RunFields
    params: GenerationParams
    preset: str | None = None
    plan: Plan | None = None
    # The request field a plan refused for the key's rules names.
    param: str = "model"
    # Whether the response carries the per-call detail (a key may be refused it).
    detail: bool = False
    # The tools the request offers (None: none), and how their final calls are decided.
    tools: ToolSet | None = None
    # The format the answer must have (None: free text).
    response_format: ResponseFormat | None = None
    # How many answers the request asks for (``n``).
    choices: int = 1


class RunBody(BaseModel):
    """What both endpoints' bodies give the request preamble (``moa.api.serving``)."""

    @property
    def end_user(self) -> str | None:
        """The client's id of its end user, for the request's span and log line."""
        return None

    def chat_messages(self) -> list[ChatMessage]:
        raise NotImplementedError

    def run_spec(self) -> RunSpec:
        raise NotImplementedError


class ChatCompletionRequest(RunBody):
    # Bodies are read with finite numbers only (moa.api.jsonbody); a model built another way is too.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1)
    messages: list[InMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    # How many answers (choices): up to caps.max_n, checked with the other caps (moa.engine.choices).
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    reasoning_effort: ReasoningEffort | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Who the end user is, by the client's own id: never sent to a provider, recorded on the
    # request's log line and span for correlation (``safety_identifier`` is its newer name).
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    tools: list[InTool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[InFunction] | None = None
    function_call: Any = None
    # text, json_object or json_schema (``response_format()`` checks it as OpenAI does).
    response_format: Any = None
    moa: MoAOptions = MoAOptions()

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(k for k in data if k not in OPENAI_FIELDS and k != "moa")
            if unknown:
                raise UnknownParameter(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        return data

    @property
    def end_user(self) -> str | None:
        """The client's id of its end user (``user``, else ``safety_identifier``)."""
        return self.user or self.safety_identifier

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        return check_logit_bias(v)

    @field_validator("stop")
    @classmethod
    def _stop_size(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        extra = self.model_extra or {}
        for name, (accepted, why) in NOT_IMPLEMENTED.items():
            if name in extra and extra[name] not in accepted:
                raise ParamError(f"{name!r} is not supported by this service: {why}", name)
        return self

    def chat_messages(self) -> list[ChatMessage]:
        return chat_messages(self.messages)

    def tool_set(self) -> ToolSet | None:
        return tool_set(
            self.tools, self.tool_choice, self.parallel_tool_calls, self.functions, self.function_call
        )

    def run_spec(self) -> RunSpec:
        return RunSpec(
            self.moa,
            self.params(),
            preset=self.model,
            detail=self.moa.detail,
            tools=self.tool_set(),
            response_format=response_format(self.response_format),
            choices=self.n,
        )

    def params(self) -> GenerationParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop) if self.stop else None
        return GenerationParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            seed=self.seed,
            stop=stop,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
            reasoning_effort=self.reasoning_effort,
        )


class MoARequest(RunBody):
    """``POST /v1/moa``: an explicit plan (or a preset) and the full result back."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    messages: list[InMessage] = Field(min_length=1)
    plan: Plan | None = None
    preset: str | None = None
    params: GenerationParams = GenerationParams()
    deadline_s: float | None = Field(default=None, gt=0, le=3600)
    max_cost_usd: float | None = Field(default=None, gt=0)
    aggregation: AggregationMode | None = None
    cache: Literal["default", "no-cache", "no-store", "off"] = "default"
    cache_semantic: bool = False
    cache_sampled: bool = False
    # Tools, as on a chat completion; ``tool_mode`` as a chat completion's ``moa.tools``.
    tools: list[InTool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    tool_mode: ToolMode | None = None
    # As on a chat completion.
    response_format: Any = None
    # Several answers, as a chat completion's ``n``: the result's ``choices`` lists them.
    n: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> MoARequest:
        if self.plan is not None and self.preset is not None:
            raise ParamError("give either plan or preset, not both", "plan")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        return chat_messages(self.messages)

    def run_spec(self) -> RunSpec:
        param = "plan" if self.plan is not None else "preset"
        tools = tool_set(self.tools, self.tool_choice, self.parallel_tool_calls)
        # The full result is the detail.
        return RunSpec(
            self,
            self.params,
            preset=self.preset,
            plan=self.plan,
            param=param,
            detail=True,
            tools=tools,
            response_format=response_format(self.response_format),
            choices=self.n,
        )


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
