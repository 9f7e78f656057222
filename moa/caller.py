"""The one seam between the engine and a transport.

In-process the provider pool implements it; in the Ray Serve app, handles to the provider
deployments do. The engine never knows which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from moa.types import CallRequest, CallResult, StreamEvent


@runtime_checkable
class ModelCaller(Protocol):
    async def call(self, req: CallRequest) -> CallResult:
        """Run one model call. Failures come back in ``CallResult.error``; only cancellation raises."""
        ...

    def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        """Stream one model call: ``TextDelta``s, then exactly one final ``CallResult``."""
        ...
