"""A streamed answer's machinery: the engine's events pumped in a task of their own
(``EventPump``), and the response that owns its request's slot, events and spend until it ends
(``AdmittedStream``). The bytes it sends are written in ``moa.api.sse``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moa.api.access import settle_quietly
from moa.api.admission import Slot
from moa.api.cancel import ended
from moa.api.gate import SpendGate
from moa.deadline import Deadline
from moa.errors import MoAError


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END: Any = object()
_STOP: Any = object()
# What ``EventPump.next`` returns when nothing came within its ``idle_s``.
IDLE: Any = object()


class EventPump:
    """A stream's events, produced in a task of their own, so the response can stop waiting for
    them at any moment (the drain ran out, the deadline passed) and still end the stream properly
    with an error event and [DONE]. One event is read ahead at most."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self._events = events
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.stopped: MoAError | None = None
        self._timer: asyncio.TimerHandle | None = None
        # A read still waiting after ``next`` stopped waiting for it (idle): the next call resumes it.
        self._read: asyncio.Future[Any] | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for ev in self._events:
                await self._queue.put(ev)
            await self._queue.put(_END)
        except Exception as e:
            await self._queue.put(_Failed(e))
        finally:
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]

    async def next(self, idle_s: float | None = None) -> Any:
        """The next event; None at the end; ``IDLE`` when none came within ``idle_s`` (the read
        goes on, nothing is lost). Raises what the events raised, or why it was stopped."""
        if self.stopped is not None:
            raise self.stopped
        if self._read is None:
            self._read = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._read}, timeout=idle_s)
        if not done:
            return IDLE
        item, self._read = self._read.result(), None
        if item is _STOP:
            assert self.stopped is not None
            raise self.stopped
        if item is _END:
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item

    def stop(self, error: MoAError) -> None:
        """End the stream with ``error``: the reader gets it now, the events are cancelled."""
        if self.stopped is not None:
            return
        self.stopped = error
        with contextlib.suppress(asyncio.QueueFull):  # full: the reader is busy and checks first
            self._queue.put_nowait(_STOP)
        self._task.cancel()

    def stop_at(self, deadline: Deadline, error: MoAError) -> None:
        """``stop(error)`` at ``deadline``, unless the stream ends first."""
        when = deadline.loop_time()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self.stop, error)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._read is not None:
            self._read.cancel()
        await ended(self._task)


class AdmittedStream(StreamingResponse):
    """A stream that owns its request's admission slot and event source: both are released when
    the response ends, however it ends (finished, failed, client gone, or never started)."""

    def __init__(
        self, content: AsyncIterator[bytes], slot: Slot, events: EventPump, spend: SpendGate | None = None
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.slot, self.events, self.spend = slot, events, spend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            try:
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
                with contextlib.suppress(Exception):
                    await self.events.aclose()
            finally:
                # After the events (even when this request was cancelled meanwhile: ``ended``):
                # every call has been counted.
                if self.spend is not None:
                    await settle_quietly(self.spend.spend)
