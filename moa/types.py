"""The normalised vocabulary every layer speaks: messages, parameters, call results, error kinds.

Provider adapters produce these, the engine consumes them, the Ray deployments pass them over the
wire (they are plain pydantic models, so they pickle and serialise to JSON).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorKind(StrEnum):
    """Why a provider call failed, independent of the provider's own exception types."""

    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    BAD_REQUEST = "bad_request"
    AUTH = "auth"
    MALFORMED_RESPONSE = "malformed_response"
    CANCELLED = "cancelled"
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

Role = Literal["system", "user", "assistant"]
# Generation parameters a model may refuse: an adapter drops them (and says so on the call) rather
# than failing the call. max_tokens is not among them: it bounds what an answer costs.
DroppableParam = Literal["temperature", "top_p", "seed", "stop"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


class GenerationParams(BaseModel):
    """Sampling parameters common to the three wire protocols."""

    model_config = ConfigDict(frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] | None = None


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
    # and said how long it may be (``moa.providers.base.context_window_in``). It travels with the
    # failure so that whoever fits the references (the ingress, on Ray) learns it too.
    context_window: int | None = None


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


class CallResult(BaseModel):
    """What every adapter returns, success or failure, whatever the provider."""

    provider: str
    provider_kind: str
    requested_model: str
    model: str | None = None  # the model the provider says answered
    text: str = ""
    usage: Usage = Usage()
    finish_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None  # time to first token, streaming calls only
    cost_usd: float = 0.0
    # ``usage`` (and so ``cost_usd``) is our estimate, not the provider's report: the call ended
    # before the provider said what it used (cut by us or the client, or failed mid-stream), and
    # it is billed for the prompt plus the text received (``moa.engine.calls.cut_result``).
    usage_estimated: bool = False
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


StreamEvent = TextDelta | CallResult
