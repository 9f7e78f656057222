"""Request and response bodies of the OpenAI-compatible API, plus the ``moa`` extension."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from moa.plan import AggregationMode, Plan
from moa.types import OPENAI_CHAT_FIELDS, ChatMessage, GenerationParams, ReasoningEffort, check_logit_bias


class ParamError(ValueError):
    """A validation failure that knows which request field is at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class InMessage(BaseModel):
    """A chat message as OpenAI clients send it: content may be a string or a list of parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def to_chat(self) -> ChatMessage:
        if isinstance(self.content, list):
            kinds = {p.type for p in self.content} - {"text"}
            if kinds:
                raise ValueError(f"only text content is supported, not {', '.join(sorted(kinds))}")
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text)


def chat_messages(messages: list[InMessage]) -> list[ChatMessage]:
    """The one rule both endpoints apply to a message list: text content only, and at least one
    user message. Raises ``ParamError`` naming the field at fault."""
    out = []
    for i, m in enumerate(messages):
        try:
            out.append(m.to_chat())
        except ValueError as e:
            raise ParamError(str(e), f"messages.{i}.content") from None
    if not any(m.role == "user" for m in out):
        raise ParamError("messages must contain a user message", "messages")
    return out


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
    "parallel_tool_calls": ((None,), "tool calls are not supported by this service"),
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
    n: int = Field(default=1, ge=1, le=1)
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
    def _no_tools(self) -> ChatCompletionRequest:
        extra = self.model_extra or {}
        for unsupported in ("tools", "functions", "tool_choice"):
            if extra.get(unsupported):
                raise ParamError(f"{unsupported!r} is not supported by this service", unsupported)
        for name, (accepted, why) in NOT_IMPLEMENTED.items():
            if name in extra and extra[name] not in accepted:
                raise ParamError(f"{name!r} is not supported by this service: {why}", name)
        fmt = extra.get("response_format")
        # Plain text is what every answer is anyway; JSON modes would need the proposers to agree.
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ParamError(
                "only response_format {'type': 'text'} is supported by this service", "response_format"
            )
        return self

    def chat_messages(self) -> list[ChatMessage]:
        return chat_messages(self.messages)

    def run_spec(self) -> RunSpec:
        return RunSpec(self.moa, self.params(), preset=self.model, detail=self.moa.detail)

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

    @model_validator(mode="after")
    def _one_of(self) -> MoARequest:
        if self.plan is not None and self.preset is not None:
            raise ParamError("give either plan or preset, not both", "plan")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        return chat_messages(self.messages)

    def run_spec(self) -> RunSpec:
        param = "plan" if self.plan is not None else "preset"
        # The full result is the detail.
        return RunSpec(self, self.params, preset=self.preset, plan=self.plan, param=param, detail=True)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
