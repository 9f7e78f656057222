"""The seam below the provider policy: what one SDK adapter implements, and nothing more.

An adapter sends one attempt (a plain call, or a stream of text pieces ending in its ``Attempt``;
a tool call's name and argument fragments come as ``ToolFragment``s, counted, never shown),
types its SDK's exceptions as ``AttemptError``, and may fit parameters to its API, name the
parameter a refusal is about and report the context window its server serves. Retries, the
deadline, the breaker, the slot, the rate budget, learned refusals, cost, spans and logs are the
policy's (``moa.providers.client``), the same over every adapter, and over the scripted double
(``moa.providers.scripted``) that tests the policy without an SDK or a wire.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moa.config import Endpoint, ProviderConfig
from moa.types import CallRequest, ErrorKind, GenerationParams, ToolCall, Usage

__all__ = [
    "Attempt",
    "AttemptError",
    "RefusalFragment",
    "SDKTransport",
    "ToolFragment",
    "Transport",
    "refused_unsent",
]


@dataclass
class Attempt:
    """A successful attempt, before normalisation. ``finish_reason`` is ours: ``stop``,
    ``length``, ``content_filter``, ``tool_calls`` (the model called tools) or ``other``."""

    text: str
    model: str | None
    usage: Usage
    finish_reason: str | None
    service_s: float | None = None
    # The calls the model made, assembled (in a stream: from their fragments), in its order.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The model's refusal, when it refused (``CallResult.refusal``); in a stream, its pieces came
    # as ``RefusalFragment``s and this is them joined (or the API's own account of the refusal).
    refusal: str | None = None


@dataclass(frozen=True)
class ToolFragment:
    """A piece of a tool call as it streams in (a name, or a fragment of the arguments' JSON).
    Not answer text: it is never passed on as a delta, but it was generated, so a stream cut after
    it is billed for it, and is not retried (``moa.providers.consumption``). The whole calls come
    in the stream's final ``Attempt``."""

    text: str


@dataclass(frozen=True)
class RefusalFragment:
    """A piece of a refusal as it streams in (OpenAI's ``delta.refusal``). Not answer text: never
    passed on as a delta (the whole refusal comes in the stream's final ``Attempt``), but
    generated, so billed like a ``ToolFragment`` if the stream is cut after it."""

    text: str


class AttemptError(Exception):
    """A failed attempt, already typed."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        status: int | None = None,
        retry_after_s: float | None = None,
        service_s: float | None = None,
        *,
        unsent: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status
        self.retry_after_s, self.service_s = retry_after_s, service_s
        # Refused by the adapter before anything was sent (a conversation its API cannot carry):
        # no prompt was read, so nothing is billed for the attempt.
        self.unsent = unsent


def refused_unsent(message: str) -> AttemptError:
    """A request the provider's API would refuse (a conversation, tools or a format it cannot
    take), refused by its adapter before anything is sent: a bad request, neither retried nor
    billed (nothing was read), with no HTTP status (no provider answered), never held against the
    provider's health."""
    return AttemptError(ErrorKind.BAD_REQUEST, message, unsent=True)


class Transport(ABC):
    """One provider API as the policy sees it: one attempt at a time, errors typed."""

    kind: ClassVar[str]

    @abstractmethod
    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        """Send one non-streaming attempt; raise on failure."""

    @abstractmethod
    def open_stream(
        self, req: CallRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolFragment | RefusalFragment | Attempt]:
        """Send one streaming attempt: yield text pieces (and tool call or refusal fragments),
        then one Attempt carrying the assembled tool calls (and the refusal); raise on failure."""

    @abstractmethod
    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        """Type an exception this transport raised (``in_stream``: after the stream opened)."""

    def adapt(self, model: str, params: GenerationParams) -> tuple[GenerationParams, list[str]]:
        """Fit the parameters to what this API accepts (ranges, limits, combinations); return them
        with one note per change. The default changes nothing."""
        return params, []

    def refused_param(self, message: str) -> str | None:
        """The parameter (our name) a 400 message says the model refuses, in this API's words."""
        return None

    def known_window(self, model: str) -> int | None:
        """The context window the server itself reports for ``model``, if known by now; never
        waited for (the first ask may start reading it). The default knows none."""
        return None

    async def aclose(self) -> None:
        return None


class SDKTransport(Transport):
    """A transport over a provider's official async SDK: one SDK client per provider, created
    once and reused, so its connection pool is shared by every call."""

    def __init__(self, name: str, cfg: ProviderConfig, endpoint: Endpoint) -> None:
        self.name, self.cfg, self.endpoint = name, cfg, endpoint
        self._secret = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        self._sdk = self._make_sdk()

    @abstractmethod
    def _make_sdk(self) -> Any:
        """The provider's official async SDK client, with SDK-internal retries off."""
