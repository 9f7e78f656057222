"""The engine's transports over Ray Serve handles: model calls to the provider deployments,
fusion to the aggregator deployment. Every call carries the
W3C trace context (``trace=``) so the callee's spans join the caller's trace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from moa.engine.fusion import FuseEvent, FuseJob
from moa.types import CallError, CallRequest, CallResult, ErrorKind, StreamEvent
from observability.tracing import inject


def deployment_name(provider: str) -> str:
    return f"provider-{provider}"


def _unknown(req: CallRequest) -> CallResult:
    return CallResult(
        provider=req.provider,
        provider_kind="unknown",
        requested_model=req.model,
        error=CallError(kind=ErrorKind.BAD_REQUEST, message=f"no provider named {req.provider!r}"),
    )


class HandleCaller:
    """``ModelCaller`` over the provider deployments: one handle per provider."""

    def __init__(self, handles: Mapping[str, Any]) -> None:
        self._handles = dict(handles)
        self._streams = {name: h.options(stream=True) for name, h in self._handles.items()}

    async def call(self, req: CallRequest) -> CallResult:
        handle = self._handles.get(req.provider)
        if handle is None:
            return _unknown(req)
        response = handle.call.remote(req, trace=inject())
        try:
            result: CallResult = await response
        except asyncio.CancelledError:
            # Awaiting a response and being cancelled does not cancel the request in the replica
            # (only a cancelled parent request does): a straggler would keep its provider call,
            # its concurrency slot and its cost. Say so explicitly.
            response.cancel()
            raise
        return result

    async def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        handle = self._streams.get(req.provider)
        if handle is None:
            yield _unknown(req)
            return
        async for ev in _cancelling(handle.stream.remote(req, trace=inject())):
            yield ev


class RemoteFuser:
    """``Fuser`` over the aggregator deployment (a streaming generator method)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)

    async def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]:
        async for ev in _cancelling(self._handle.fuse.remote(job, trace=inject())):
            yield ev


async def _cancelling(responses: Any) -> AsyncIterator[Any]:
    """Iterate a streaming handle response; if iteration stops early (the consumer closed the
    stream or was cancelled), cancel the request in the replica too."""
    finished = False
    try:
        async for item in responses:
            yield item
        finished = True
    finally:
        if not finished:
            responses.cancel()
