"""The one seam between the engine and a transport.

In-process the provider pool implements it; in the Ray Serve app, handles to the provider
deployments do. The engine never knows which.

Whether a call is background work (a batch's) is the request's, not the engine's: the API marks
the whole request (``BACKGROUND``, a context variable its tasks inherit), and each transport marks
the calls it sends for it (``as_sent``), so the mark crosses to a provider replica on Ray with the
call itself. A background call takes a provider's rate budget and concurrency only above the share
kept for interactive calls (``moa.limits``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from moa.types import CallRequest, CallResult, StreamEvent

# Set while the API serves a request marked as batch work; the engine's tasks inherit it.
BACKGROUND: ContextVar[bool] = ContextVar("moa_background", default=False)


@contextlib.contextmanager
def background_work(on: bool = True) -> Iterator[None]:
    """The calls made within are background work when ``on``: what the API sets around a batch's
    request, for as long as it runs (its stream included)."""
    token = BACKGROUND.set(on)
    try:
        yield
    finally:
        BACKGROUND.reset(token)


def as_sent(req: CallRequest) -> CallRequest:
    """``req`` as a transport sends it: marked ``background`` when the work it is made for is."""
    if BACKGROUND.get() and not req.background:
        return req.model_copy(update={"background": True})
    return req


@runtime_checkable
class ModelCaller(Protocol):
    async def call(self, req: CallRequest) -> CallResult:
        """Run one model call. Failures come back in ``CallResult.error``; only cancellation raises."""
        ...

    def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        """Stream one model call: ``TextDelta``s, then exactly one final ``CallResult``."""
        ...
