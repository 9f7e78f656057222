"""The engine's transports over Ray Serve handles: model calls to the provider deployments,
fusion to the aggregator deployment. Every call carries the
W3C trace context (``trace=``) so the callee's spans join the caller's trace, and the mark of
background work (``CallRequest.background``, ``FuseJob.background``) when the request is a batch's.

Every call is bounded by its own deadline: a handle call to a deployment with no running replica
(one whose replicas cannot be scheduled, say) would otherwise wait for one forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from moa.caller import BACKGROUND, as_sent
from moa.deadline import Deadline
from moa.engine.fusion import FuseEvent, FuseJob
from moa.types import CallError, CallRequest, CallResult, ErrorKind, StreamEvent, Usage
from moa_observability.tracing import inject

# A provider replica ends a call at its deadline (``timeout_s``) itself and answers with a timeout
# result; the caller stops waiting this much later, when no replica answered at all.
HANDLE_GRACE_S = 1.0
# For a call that names no deadline (none of the engine's do): the providers' default timeout.
DEFAULT_TIMEOUT_S = 60.0


def deployment_name(provider: str) -> str:
    return f"provider-{provider}"


def _unknown(req: CallRequest) -> CallResult:
    return CallResult(
        provider=req.provider,
        provider_kind="unknown",
        requested_model=req.model,
        error=CallError(kind=ErrorKind.BAD_REQUEST, message=f"no provider named {req.provider!r}"),
    )


def _no_answer(req: CallRequest, waited_s: float) -> CallResult:
    return CallResult(
        provider=req.provider,
        provider_kind="unknown",
        requested_model=req.model,
        latency_s=waited_s,
        error=CallError(
            kind=ErrorKind.TIMEOUT,
            message=f"no replica of {deployment_name(req.provider)} answered within {waited_s:.1f}s",
        ),
    )


class HandleCaller:
    """``ModelCaller`` over the provider deployments: one handle per provider."""

    def __init__(self, handles: Mapping[str, Any]) -> None:
        self._handles = dict(handles)
        self._streams = {name: h.options(stream=True) for name, h in self._handles.items()}

    @staticmethod
    def _bound(req: CallRequest) -> float:
        return (req.timeout_s or DEFAULT_TIMEOUT_S) + HANDLE_GRACE_S

    async def call(self, req: CallRequest) -> CallResult:
        req = as_sent(req)  # a batch request's calls cross to the provider replica marked
        handle = self._handles.get(req.provider)
        if handle is None:
            return _unknown(req)
        bound = self._bound(req)
        response = handle.call.remote(req, trace=inject())
        try:
            async with asyncio.timeout(bound):
                result: CallResult = await response
        except TimeoutError:
            response.cancel()
            return _no_answer(req, bound)
        except asyncio.CancelledError:
            # Awaiting a response and being cancelled does not cancel the request in the replica
            # (only a cancelled parent request does): a straggler would keep its provider call,
            # its concurrency slot and its cost. Say so explicitly.
            response.cancel()
            raise
        return result

    async def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        req = as_sent(req)
        handle = self._streams.get(req.provider)
        if handle is None:
            yield _unknown(req)
            return
        deadline = Deadline.after(self._bound(req))
        responses = _cancelling(handle.stream.remote(req, trace=inject()))
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline.loop_time()):
                        ev = await anext(responses, None)
                except TimeoutError:
                    yield _no_answer(req, self._bound(req))
                    return
                if ev is None:
                    return
                yield ev
        finally:
            await responses.aclose()


class BoardReceipts:
    """``ReceiptSource`` over the health board, where the provider replicas leave the receipts of
    the calls their callers cut (``moa.engine.receipts``)."""

    def __init__(self, board: Any) -> None:
        self._board = board

    async def receipts(self, call_ids: Collection[str], within_s: float) -> Mapping[str, Usage]:
        """What arrives within ``within_s`` (the board waits that long); nothing if the board does
        not answer soon after, as when it is restarting: the calls keep their estimates."""
        response = self._board.take_receipts.remote(list(call_ids), within_s)
        try:
            async with asyncio.timeout(within_s + HANDLE_GRACE_S):
                got: Mapping[str, Usage] = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception:
            response.cancel()
            return {}
        return got


class RemoteFuser:
    """``Fuser`` over the aggregator deployment (a streaming generator method)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle.options(stream=True)

    async def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]:
        if BACKGROUND.get() and not job.background:  # the aggregator's calls are a batch's too
            job = job.model_copy(update={"background": True})
        events = _cancelling(self._handle.fuse.remote(job, trace=inject()))
        if job.remaining_s is None:
            async for ev in events:
                yield ev
            return
        # With no aggregator replica the chain ends at its deadline, with no answer: the engine
        # then reports the deadline (504) as it would for a chain that ran out of time.
        deadline = Deadline.after(job.remaining_s + HANDLE_GRACE_S)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline.loop_time()):
                        ev = await anext(events, None)
                except TimeoutError:
                    return
                if ev is None:
                    return
                yield ev
        finally:
            await events.aclose()


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
