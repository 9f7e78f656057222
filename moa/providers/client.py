"""``ProviderClient``: the policy every provider call goes through, over one ``Transport``.

The transport (an SDK adapter, or the scripted double) sends one attempt at a time. Here, around
it: the key check, the circuit breaker, the concurrency slot and the rate budget
(``moa.providers.gate``); retries with backoff and the provider's retry hints, within one
deadline (``moa.providers.retry``); parameters the model refuses (``moa.providers.refusals``);
what a call consumed and cost, however it ends (``moa.providers.consumption``); and one GenAI span
and one log line per call (here)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from opentelemetry import trace

from moa.config import Endpoint, ProviderConfig
from moa.limits import ProviderLimits
from moa.providers.call import Call
from moa.providers.consumption import Consumption, prompt_read
from moa.providers.gate import gated
from moa.providers.refusals import LearnedRefusals
from moa.providers.transport import Transport
from moa.types import (
    CallRequest,
    CallResult,
    StreamEvent,
    Usage,
    error_text,
)
from moa_observability.genai import end_call_span, start_call_span
from moa_observability.logs import span_ids

log = logging.getLogger("moa.providers")


class ProviderClient:
    """One provider's client: its transport (created once, pooled), its limits, its retry loop."""

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        endpoint: Endpoint,
        transport: Transport,
        limits: ProviderLimits | None = None,
        *,
        capture_content: bool = False,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.endpoint = endpoint
        self.transport = transport
        self.limits = limits or ProviderLimits.from_config(cfg)
        self.capture_content = capture_content
        self.secret = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        self.refusals = LearnedRefusals(name, cfg, transport, self.secret)

    @property
    def kind(self) -> str:
        return self.transport.kind

    async def complete(self, req: CallRequest) -> CallResult:
        result: CallResult | None = None
        async for ev in self._run(req, stream=False):
            if isinstance(ev, CallResult):
                result = ev
        assert result is not None
        return result

    def stream(
        self, req: CallRequest, *, on_cut: Callable[[Usage], None] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """The call, streamed. ``on_cut`` is told what the call consumed, as far as this client
        knows (every prompt an attempt sent, the text received), if the stream is closed before
        its result: a provider replica passes on that receipt for the ledger, having seen text its
        caller had not yet (``moa.engine.receipts``)."""
        return self._run(req, stream=True, on_cut=on_cut)

    def health(self) -> dict[str, object]:
        return {
            "provider": self.name,
            "kind": self.kind,
            "simulated": self.endpoint.simulated,
            **self.limits.snapshot(),
        }

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def _run(
        self, req: CallRequest, stream: bool, on_cut: Callable[[Usage], None] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """One call, traced (a GenAI ``chat {model}`` span) and logged, whatever its outcome; with
        ``on_cut``, told what it consumed if it ends without a result (see ``stream``).

        What it consumed is counted here, where it is complete however the call ends."""
        span = start_call_span(
            req, self.kind, self.endpoint.base_url, stream=stream, capture_content=self.capture_content
        )
        self.transport.known_window(req.model)  # starts reading the server's listing, once, unawaited
        result: CallResult | None = None
        used = Consumption(input_tokens=prompt_read(req, self.kind))
        try:
            # Closed with this generator, not when it is collected: a consumer that stops at a
            # yield (a provider replica cancelled while its text waits) closes the provider's
            # stream now, and the provider stops writing, and billing, now.
            async with contextlib.aclosing(gated(Call(self, req, stream, used))) as events:
                async for ev in events:
                    if isinstance(ev, CallResult):
                        ev = result = self._with_known_window(ev)
                    yield ev
        finally:
            if result is None and on_cut is not None:
                on_cut(used.billed())  # the charge of a call cut before its result
            end_call_span(span, result, capture_content=self.capture_content)
            if result is not None:
                _log_call(result, span)

    def _with_known_window(self, result: CallResult) -> CallResult:
        window = self.transport.known_window(result.requested_model)
        if window is not None and result.context_window is None:
            return result.model_copy(update={"context_window": window})
        return result


def _log_call(result: CallResult, span: trace.Span) -> None:
    log.info(
        "provider call",
        extra={
            "event": "provider_call",
            "provider": result.provider,
            "model": result.requested_model,
            "status": "ok" if result.ok else "error",
            "error_kind": result.error.kind.value if result.error else None,
            # Already redacted of the key (``Call.failure``): what the provider said.
            "error_message": error_text(result.error.message) if result.error else None,
            "latency_s": round(result.latency_s, 4),
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cost_usd": result.cost_usd,
            "attempts": result.attempts,
            "adjustments": result.adjustments or None,
            **span_ids(span),
        },
    )
