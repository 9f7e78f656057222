"""The normalised vocabulary every layer speaks: messages, parameters, call results, error kinds.

Provider adapters produce these, the engine consumes them, the Ray deployments pass them over the
wire (they are plain pydantic models, so they pickle and serialise to JSON).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moa.images import (
    ASSUMED_SIZE,
    anthropic_tokens,
    b64decode,
    gemini_tokens,
    openai_tokens,
    parse_data_url,
    sniff,
)


class ErrorKind(StrEnum):
    """Why a provider call failed, independent of the provider's own exception types."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    BAD_REQUEST = "bad_request"
    AUTH = "auth"
    MALFORMED_RESPONSE = "malformed_response"
    CANCELLED = "cancelled"
    # The model answered, but not within the request's contract (a tool call its schema rejects,
    # a call to an undeclared function, text where a call was required): the next model of the
    # chain is asked, with the violation in its prompt. A fault of the answer, not of the
    # provider's service: never held against its health, never retried as it stands.
    INVALID_OUTPUT = "invalid_output"
    # Not a provider answer: our own circuit breaker refused the call without sending it.
    CIRCUIT_OPEN = "circuit_open"
    # Not a provider answer either: something failed on our side (text that cannot be encoded, an
    # SDK rejecting its arguments, a bug of ours). Logged with its type; never held against a provider.
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def counts_against_health(self) -> bool:
        """Whether this failure says something about the provider's health (for the circuit breaker)."""
        return self in _UNHEALTHY


_RETRYABLE = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.SERVER_ERROR, ErrorKind.TIMEOUT})
_UNHEALTHY = frozenset(
    {ErrorKind.RATE_LIMITED, ErrorKind.SERVER_ERROR, ErrorKind.TIMEOUT, ErrorKind.MALFORMED_RESPONSE}
)

Role = Literal["system", "user", "assistant", "tool"]
# Generation parameters a model may refuse: an adapter drops them (and says so on the call) rather
# than failing the call. max_tokens is not among them: it bounds what an answer costs.
DroppableParam = Literal[
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "reasoning_effort",
]
# OpenAI's reasoning_effort values; a model that takes none of them refuses the parameter (learned
# from its 400, or listed in the config's unsupported_params) and it is dropped, with a note.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ToolCall(BaseModel):
    """One function call a model made: its id (the provider's, or one made up where the API gives
    none, as Gemini's may not), the function's name, and its arguments as the JSON text the model
    wrote (kept as written: it is validated, never silently repaired)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    arguments: str = "{}"


class ToolSpec(BaseModel):
    """A function tool a request offers, by OpenAI's fields: its JSON Schema ``parameters`` are the
    contract every final call is validated against."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    # OpenAI's strict mode (structured outputs): the arguments are held to the schema by decoding.
    strict: bool | None = None


class ToolChoice(BaseModel):
    """What a model may do with the tools: ``auto`` (call or answer), ``none`` (answer in text),
    ``required`` (call at least one), or ``function`` (call the one named)."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


class ToolSet(BaseModel):
    """The tools of one request, with its choice and whether several calls may come at once. It
    travels with every call of the run (proposers and aggregators see the same tools)."""

    model_config = ConfigDict(frozen=True)

    tools: tuple[ToolSpec, ...]
    choice: ToolChoice = ToolChoice()
    # OpenAI's parallel_tool_calls (true by default): false allows at most one call per answer.
    parallel: bool = True
    # The request used OpenAI's legacy ``functions``/``function_call``: answered the legacy way.
    legacy: bool = False

    def spec(self, name: str) -> ToolSpec | None:
        return next((t for t in self.tools if t.name == name), None)


class ResponseFormat(BaseModel):
    """The document format a call's answer must have (OpenAI's ``response_format``): any JSON
    object (``json_object``), or one a JSON Schema accepts (``json_schema``). Each adapter asks for
    it in its API's own form; the engine validates what comes back."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    type: Literal["json_object", "json_schema"]
    # json_schema only: the schema's name, the schema, and OpenAI's strict switch.
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    # json_schema only: what the document is for (OpenAI's ``json_schema.description``).
    description: str | None = None

    @property
    def prompt_text(self) -> str:
        """What of the format a model reads as prompt tokens: the schema (every provider puts it
        in the prompt and bills it), or nothing for a plain JSON object."""
        if self.json_schema is None:
            return ""
        return json.dumps(self.json_schema, ensure_ascii=False, separators=(",", ":"))


ImageDetail = Literal["auto", "low", "high"]


class ImagePart(BaseModel):
    """An image a user message carries (OpenAI's ``image_url`` part), checked by the API: ``url``
    is an ``https://`` URL (never fetched by the service: it goes only to providers that take
    URLs) or a ``data:`` URL holding the image itself, whose format and size were read from its
    header (``media_type``, ``width``, ``height``; None for a URL, whose size is unknown)."""

    model_config = ConfigDict(frozen=True)

    url: str
    # OpenAI's detail level; only OpenAI's API reads it (and its token rule counts by it).
    detail: ImageDetail = "auto"
    media_type: str | None = None
    width: int | None = None
    height: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _measured(cls, data: Any) -> Any:
        """A data URL's format and size, read from its header when not given (a program building
        its own ImagePart); a data URL holding no PNG, JPEG, GIF or WebP is refused."""
        if (
            isinstance(data, dict)
            and str(data.get("url", "")).startswith("data:")
            and not data.get("media_type")
        ):
            found = parse_data_url(data["url"])
            seen = sniff(b64decode(found[2]) or b"") if found is not None and found[1] else None
            if seen is None:
                raise ValueError("an image data URL must hold a base64 PNG, JPEG, GIF or WebP")
            data = {**data, "media_type": seen[0], "width": seen[1], "height": seen[2]}
        return data

    @property
    def is_data(self) -> bool:
        """Whether the image itself is here (a data URL), rather than a URL to it."""
        return self.url.startswith("data:")

    @property
    def base64(self) -> str:
        """A data URL's payload (base64), as Anthropic's and Gemini's APIs take it; "" for a URL."""
        found = parse_data_url(self.url) if self.is_data else None
        return found[2] if found is not None else ""

    @property
    def data(self) -> bytes:
        """A data URL's image bytes; b"" for a URL."""
        return (b64decode(self.base64) or b"") if self.is_data else b""

    @property
    def nbytes(self) -> int:
        """The image's size in bytes (a data URL's, decoded); 0 for a URL."""
        payload = self.base64
        return len(payload) * 3 // 4 - payload[-2:].count("=")

    def digest(self) -> str:
        """What a cache key holds of it: a hash of the image's bytes, or of its URL."""
        return hashlib.sha256(self.data if self.is_data else self.url.encode()).hexdigest()


class ChatMessage(BaseModel):
    """A message of the conversation, normalised: text content; an assistant turn may carry the
    tool calls it made, and a ``tool`` turn is the result of one of them (``tool_call_id``, and
    ``name``: the function it answers, which Gemini's API needs and OpenAI's does not carry). A
    user turn may carry images, sent after its text (its text parts are joined, in order)."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    # The images of a user turn (``image_url`` parts), in the order given; text counts apart.
    images: tuple[ImagePart, ...] = ()

    @property
    def token_text(self) -> str:
        """What of this message a model reads, as text: its content and any calls it carries."""
        if not self.tool_calls:
            return self.content
        calls = " ".join(f"{c.name} {c.arguments}" for c in self.tool_calls)
        return f"{self.content} {calls}" if self.content else calls


def prompt_texts(
    messages: Iterable[ChatMessage],
    tools: ToolSet | None = None,
    response_format: ResponseFormat | None = None,
) -> list[str]:
    """What a model reads of a prompt, as texts to count tokens in: each message (its calls
    included), the tool definitions and the response format's schema, which every provider bills
    as prompt tokens."""
    texts = [m.token_text for m in messages]
    if tools is not None:
        texts.append(json.dumps([t.model_dump(exclude_none=True) for t in tools.tools]))
    if response_format is not None and response_format.prompt_text:
        texts.append(response_format.prompt_text)
    return texts


def request_images(messages: Iterable[ChatMessage]) -> list[ImagePart]:
    """Every image the conversation carries, in order."""
    return [image for m in messages for image in m.images]


# The size an image given by URL is counted at, per rule: it is never fetched, so its size is
# unknown, and it is counted as the largest image the rule bills (OpenAI's high detail: 2048x768,
# 8 tiles, 1,445 tokens; Anthropic's: about 1,600), so an estimate errs high, never low. Gemini
# is never sent a URL (moa.engine.vision); its figure is a typical upload's, for completeness.
_URL_SIZE = {"openai": (2048, 768), "anthropic": (1568, 1568), "gemini": (ASSUMED_SIZE, ASSUMED_SIZE)}


def image_tokens(provider_kind: str, images: Iterable[ImagePart]) -> int:
    """The input tokens ``images`` cost on a provider of ``provider_kind`` (the config's kind:
    ``anthropic``, ``gemini``, else OpenAI's wire), by its published rule: OpenAI's tiles by
    detail (``auto`` counted as ``high``), Anthropic's width x height / 750, Gemini's 258 per
    768px tile. Approximate: OpenAI's patch-priced models (GPT-4.1 mini and nano, o4-mini) and
    GPT-4o mini's multipliers are counted by the tile rule. What projections, and the estimate of
    a call cut before its provider reported its usage, count for images."""
    rule = provider_kind if provider_kind in ("anthropic", "gemini") else "openai"
    total = 0
    for image in images:
        w, h = (image.width, image.height) if image.width and image.height else _URL_SIZE[rule]
        if rule == "openai":
            total += openai_tokens(w, h, image.detail)
        elif rule == "anthropic":
            total += anthropic_tokens(w, h)
        else:
            total += gemini_tokens(w, h)
    return total


def priced_messages(
    messages: Iterable[ChatMessage],
    tools: ToolSet | None = None,
    response_format: ResponseFormat | None = None,
) -> list[ChatMessage]:
    """The messages as a projection counts them: with the tool definitions and the response
    format's schema as more prompt messages, since every provider bills them as prompt tokens
    (and caps count them as input)."""
    found = list(messages)
    for text in prompt_texts((), tools, response_format):
        found.append(ChatMessage(role="system", content=text))
    return found


class GenerationParams(BaseModel):
    """Generation parameters, by OpenAI's names (the API's vocabulary). Each adapter sends what its
    protocol has, translated, and drops or fits the rest with a note in the call's adjustments, so
    nothing a request asked for disappears without a word. Strict about names: a misspelt field
    (``/v1/moa``'s ``params``) is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Token id (as a string, OpenAI's JSON form) -> bias in [-100, 100]; ids of OpenAI's tokenizers.
    logit_bias: dict[str, int] | None = None
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        return check_logit_bias(v)


def check_logit_bias(v: dict[str, int] | None) -> dict[str, int] | None:
    """OpenAI's rule for logit_bias: token ids (digits) to biases in [-100, 100]."""
    if v is not None:
        for token, bias in v.items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], not {bias}")
    return v


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
        )


class CallError(BaseModel):
    kind: ErrorKind
    message: str
    status_code: int | None = None
    # When the provider (its Retry-After) or our own limits say a retry could succeed.
    retry_after_s: float | None = None
    # The model's real context window (tokens), when the provider refused the prompt as too long
    # and said how long it may be (``moa.providers.wire.context_window_in``). It travels with the
    # failure so that whoever fits the references (the ingress, on Ray) learns it too.
    context_window: int | None = None


# A provider's error message, as far as a log line or span status carries it.
MAX_ERROR_CHARS = 300


def error_text(message: str) -> str:
    """A failure's message as logs and spans carry it: whitespace folded, at most
    ``MAX_ERROR_CHARS`` (a provider may return a whole HTML page as its error)."""
    text = " ".join(message.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# Every top-level field of OpenAI's chat completions request (openai-python's
# CompletionCreateParams): what the API accepts (refusing anything else by name, as OpenAI does)
# and what the simulator's OpenAI route knows.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
        "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n",
        "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
        "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
        "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
        "web_search_options",
    }
)  # fmt: skip


class CallRequest(BaseModel):
    """One model call as the engine asks for it; the transport (in-process or Ray) routes it."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = GenerationParams()
    # Overall deadline for this call, retries included; None means the provider's configured timeout.
    timeout_s: float | None = Field(default=None, gt=0)
    # The proposer's role prompt name, for traces only: never sent to the provider.
    role: str | None = None
    # How long a transport may hold a stream's text before passing it on (None: at once). A call
    # whose text nobody reads as it comes (it is streamed only so that a cut is billed for what it
    # wrote) sets it, so that a transport where each message costs (Ray's object store) sends a
    # few batches instead of one message per token. Never sent to the provider.
    batch_s: float | None = Field(default=None, gt=0)
    # Names this call to whoever saw its provider's every token: if the call is cut, a transport
    # that carried its text in batches or across processes (a provider replica on Ray) leaves a
    # receipt of what it really consumed under this id, for the ledger (``moa.engine.receipts``).
    # Never sent to the provider.
    call_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    # The tools the model may call (each adapter sends them in its API's own form), or None.
    tools: ToolSet | None = None
    # The format the answer must have (each adapter asks for it natively), or None: free text.
    response_format: ResponseFormat | None = None
    # Background work (a batch's call): it takes its provider's rate budget and concurrency only
    # above the share kept for interactive calls (``providers.*.limits.interactive_reserve``), so
    # a batch never makes an interactive request wait. Set by the transport from the request it
    # serves (``moa.caller.as_sent``); never sent to the provider.
    background: bool = False


class CallResult(BaseModel):
    """What every adapter returns, success or failure, whatever the provider."""

    provider: str
    provider_kind: str
    requested_model: str
    model: str | None = None  # the model the provider says answered
    text: str = ""
    # The function calls the model made (finish_reason ``tool_calls``); text may come with them.
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # The model refused to answer in the requested format, in its words (OpenAI's
    # ``message.refusal``; Anthropic's ``stop_reason: refusal``; Gemini's safety block): an
    # answer, returned as OpenAI returns one (content null), not a failure. None: no refusal.
    # Set, ``text`` is no answer (it is empty, or the refusal's words): never a document.
    refusal: str | None = None
    usage: Usage = Usage()
    finish_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None  # time to first token, streaming calls only
    cost_usd: float = 0.0
    # ``usage`` (and so ``cost_usd``) is our estimate, not the provider's report: the call ended
    # before the provider said what it used (cut by us or the client, or failed mid-stream), and
    # it is billed for the prompt plus the text received (``moa.engine.calls.cut_result``).
    usage_estimated: bool = False
    # The call's ``CallRequest.call_id`` when this result is the cutting side's estimate
    # (``cut_result``): its transport may report what the call really consumed under that id after
    # the cut, and the ledger charges the larger (``moa.engine.receipts``). Internal: never output.
    cut_id: str | None = Field(default=None, exclude=True)
    attempts: int = 0
    streamed: bool = False
    # Service time the provider reported for this call, summed over its attempts (OpenAI and
    # OpenAI-compatible servers send ``openai-processing-ms``; see ``provider_service_time``).
    # None when the provider reports none, as Anthropic's and Gemini's APIs do not.
    provider_service_s: float | None = None
    # What the adapter changed in the request's generation parameters to fit the model, one line
    # each ("temperature 1.5 clamped to 1.0 (...)", "temperature dropped: refused by m (...)").
    adjustments: list[str] = Field(default_factory=list)
    error: CallError | None = None
    # The context window the server says it serves this model with (an OpenAI-compatible server's
    # model listing: vLLM's ``max_model_len``, llama.cpp's per-slot ``n_ctx``), when it says.
    context_window: int | None = None
    # Served from the response cache ("exact") instead of the provider: no tokens were spent now;
    # ``saved_cost_usd`` is what the original call cost.
    cache: Literal["exact"] | None = None
    saved_cost_usd: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class TextDelta(BaseModel):
    """One piece of a streamed answer; a stream ends with the full CallResult."""

    text: str
    # Which of the run's answers it belongs to (``n`` > 1 asks for several: its ``index``).
    choice: int = 0


async def batched(events: AsyncIterator[StreamEvent], batch_s: float) -> AsyncIterator[StreamEvent]:
    """``events`` with their text passed on at most every ``batch_s`` seconds (joined), the rest
    as it comes: the first piece at once, then what arrived since the last batch whenever a piece
    comes ``batch_s`` after it, and anything held before the final result."""
    loop = asyncio.get_running_loop()
    held: list[str] = []
    sent_at: float | None = None
    async for ev in events:
        if isinstance(ev, TextDelta):
            held.append(ev.text)
            now = loop.time()
            if sent_at is None or now - sent_at >= batch_s:
                yield TextDelta(text="".join(held))
                held, sent_at = [], now
            continue
        if held:
            yield TextDelta(text="".join(held))
            held = []
        yield ev


StreamEvent = TextDelta | CallResult


@dataclass
class HealthView:
    """What the router knows of the providers right now: made by the in-process provider pool, or
    by the health board on Ray (and sent to every ingress replica)."""

    unavailable: frozenset[str] = frozenset()
    # Recent latency (seconds) per "provider/model", for choosing substitutes.
    latency_s: Mapping[str, float] = field(default_factory=dict)
