"""Building provider clients from the config, and the in-process transport over all of them."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Protocol

from moa.caller import as_sent
from moa.config import Endpoint, MoAConfig, ProviderConfig, ProviderKind, resolve_endpoint
from moa.limits import CircuitState, ProviderLimits
from moa.providers.client import ProviderClient
from moa.providers.transport import SDKTransport
from moa.types import CallError, CallRequest, CallResult, ErrorKind, HealthView, StreamEvent, Usage

# Each kind's SDK adapter, as module and class: imported when the first provider of that kind is
# built, so a process imports the SDKs of its own providers only. A provider replica serves one
# provider; the three SDKs take well over a second to import (anthropic's alone about one), which
# every replica's start and every `moa` command paid before.
ADAPTERS: dict[ProviderKind, tuple[str, str]] = {
    ProviderKind.OPENAI: ("moa.providers.openai_client", "OpenAITransport"),
    ProviderKind.OPENAI_COMPATIBLE: ("moa.providers.openai_client", "OpenAICompatibleTransport"),
    ProviderKind.ANTHROPIC: ("moa.providers.anthropic_client", "AnthropicTransport"),
    ProviderKind.GEMINI: ("moa.providers.gemini_client", "GeminiTransport"),
}


def adapter(kind: ProviderKind) -> type[SDKTransport]:
    """The SDK adapter class of ``kind``, its module imported on first use."""
    module, name = ADAPTERS[kind]
    cls: type[SDKTransport] = getattr(importlib.import_module(module), name)
    return cls


def build_client(
    name: str,
    cfg: ProviderConfig,
    endpoint: Endpoint,
    limits: ProviderLimits | None = None,
    *,
    capture_content: bool = False,
) -> ProviderClient:
    """The policy over the SDK adapter ``cfg.kind`` names."""
    transport = adapter(cfg.kind)(name, cfg, endpoint)
    return ProviderClient(name, cfg, endpoint, transport, limits, capture_content=capture_content)


class CutReceipts(Protocol):
    """Where the pool leaves what a call cut mid-stream consumed, as its client saw it
    (``moa.engine.receipts.Receipts``): everything the provider sent, tool-call fragments
    included, which the engine's estimate of a cut call does not see."""

    def put(self, call_id: str, usage: Usage) -> None: ...


class ProviderPool:
    """The in-process ``ModelCaller``: one client per configured provider, reused for every call.
    With ``receipts``, every streamed call cut before its result leaves its receipt there."""

    def __init__(self, clients: Mapping[str, ProviderClient], receipts: CutReceipts | None = None) -> None:
        self.clients = dict(clients)
        self.receipts = receipts

    @classmethod
    def from_config(
        cls,
        cfg: MoAConfig,
        sim_url: str | None = None,
        env: Mapping[str, str] | None = None,
        receipts: CutReceipts | None = None,
    ) -> ProviderPool:
        return cls(
            {
                name: build_client(
                    name,
                    pcfg,
                    resolve_endpoint(cfg, name, sim_url=sim_url, env=env),
                    capture_content=cfg.observability.capture_content,
                )
                for name, pcfg in cfg.providers.items()
            },
            receipts,
        )

    def _unknown(self, req: CallRequest) -> CallResult:
        return CallResult(
            provider=req.provider,
            provider_kind="unknown",
            requested_model=req.model,
            error=CallError(kind=ErrorKind.BAD_REQUEST, message=f"no provider named {req.provider!r}"),
        )

    async def call(self, req: CallRequest) -> CallResult:
        client = self.clients.get(req.provider)
        return await client.complete(as_sent(req)) if client else self._unknown(req)

    async def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        req = as_sent(req)
        client = self.clients.get(req.provider)
        if client is None:
            yield self._unknown(req)
            return
        sink = self.receipts
        on_cut = None if sink is None else (lambda used: sink.put(req.call_id, used))
        async for ev in client.stream(req, on_cut=on_cut):
            yield ev

    def health(self) -> dict[str, dict[str, object]]:
        return {name: client.health() for name, client in self.clients.items()}

    def health_view(self) -> HealthView:
        """What the router should know in-process: providers whose circuit is open right now."""
        return HealthView(
            unavailable=frozenset(
                n for n, c in self.clients.items() if c.limits.breaker.state is CircuitState.OPEN
            )
        )

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    async def __aenter__(self) -> ProviderPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
