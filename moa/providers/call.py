"""One call on its way through the provider policy: what it asked, its one deadline, what its
attempts have seen so far, and the ``CallResult`` it ends in, whichever way it ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moa.deadline import Deadline
from moa.providers.consumption import Consumption
from moa.providers.transport import Attempt, AttemptError
from moa.providers.wire import context_window_in, redact_key
from moa.types import CallError, CallRequest, CallResult, ErrorKind, Usage

if TYPE_CHECKING:
    from moa.providers.client import ProviderClient


@dataclass
class Call:
    """The state one call's gate and retry loop share (so neither takes a long parameter list)."""

    client: ProviderClient
    req: CallRequest
    stream: bool
    used: Consumption
    t0: float = field(default_factory=time.monotonic)
    attempts: int = 0
    relearned: int = 0  # attempts that went again at once without a parameter the model refused
    service_s: float | None = None
    ttft_s: float | None = None
    adjustments: list[str] = field(default_factory=list)
    deadline: Deadline = field(init=False)  # the call's one deadline, retries included

    def __post_init__(self) -> None:
        self.deadline = Deadline.after(self.req.timeout_s or self.client.cfg.timeout_s)

    @property
    def caller_budget(self) -> bool:
        """A deadline tighter than the provider's own timeout is the caller's budget (a layer or
        request deadline): running out of it says nothing about the provider's health."""
        timeout = self.req.timeout_s
        return timeout is not None and timeout < self.client.cfg.timeout_s

    def received(self, text: str) -> None:
        """A piece of streamed text arrived."""
        self.ttft_s = self.ttft_s if self.ttft_s is not None else time.monotonic() - self.t0
        self.used.received.append(text)

    def generated(self, fragment: str) -> None:
        """A piece of a tool call arrived in the stream (billed if the call is cut, never shown)."""
        self.ttft_s = self.ttft_s if self.ttft_s is not None else time.monotonic() - self.t0
        self.used.tool_text.append(fragment)

    def add_service(self, service_s: float | None) -> None:
        if service_s is not None:
            self.service_s = (self.service_s or 0.0) + service_s

    def cost(self, usage: Usage) -> float:
        price = self.client.cfg.price(self.req.model)
        return price.cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens)

    def answered(self, final: Attempt) -> CallResult:
        """The result of the attempt that answered."""
        self.add_service(final.service_s)
        # The provider's usage for the attempt that answered, plus the prompts that earlier
        # failed attempts had it read (a timeout, a broken connection), estimated.
        retried = self.used.billed(answered=True)
        usage = final.usage + retried
        return self.result(
            model=final.model or self.req.model,
            text="".join(self.used.received) if self.stream else final.text,
            tool_calls=final.tool_calls,
            refusal=final.refusal,
            usage=usage,
            usage_estimated=retried.total_tokens > 0,
            finish_reason=final.finish_reason,
            ttft_s=self.ttft_s,
            cost_usd=self.cost(usage),
            attempts=self.attempts,
            streamed=self.stream,
            provider_service_s=self.service_s,
            adjustments=self.adjustments,
        )

    def given_up(self, err: AttemptError) -> CallResult:
        """The failure of a call whose attempts are over. What the provider bills for the attempts
        that read the prompt, and the text a broken stream sent: never nothing for a call that
        generated."""
        billed = self.used.billed()
        return self.failure(
            err,
            usage=billed,
            cost_usd=self.cost(billed),
            usage_estimated=billed.total_tokens > 0,
            attempts=self.attempts,
            streamed=self.stream,
            ttft_s=self.ttft_s,
            provider_service_s=self.service_s,
            text="".join(self.used.received),
            adjustments=self.adjustments,
        )

    def result(self, **fields: Any) -> CallResult:
        base: dict[str, Any] = {
            "provider": self.client.name,
            "provider_kind": self.client.kind,
            "requested_model": self.req.model,
            "latency_s": time.monotonic() - self.t0,
        }
        return CallResult(**(base | fields))

    def failure(self, err: AttemptError, **fields: Any) -> CallResult:
        # A prompt refused as too long for the model: the window it names travels with the
        # failure, so the engine can fit the references to it and call again at once. Like any
        # bad request it says nothing about the provider's health (the breaker stays neutral).
        window = context_window_in(err.message) if err.kind is ErrorKind.BAD_REQUEST else None
        error = CallError(
            kind=err.kind,
            message=redact_key(err.message, self.client.secret),
            status_code=err.status,
            retry_after_s=err.retry_after_s,
            context_window=window,
        )
        return self.result(error=error, **fields)
