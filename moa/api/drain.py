"""A graceful shutdown: new requests refused, those in progress given the drain time, then the
rest ended properly (a stream with an error event and [DONE], a waiting request with a 503)."""

from __future__ import annotations

import asyncio
import logging

from moa.api.access import Access
from moa.api.admission import Admission
from moa.api.streaming import EventPump
from moa.errors import ShuttingDown

log = logging.getLogger("moa.api")

# After a drain ran out and the requests still running were told to end, how long their last
# bytes (an error event and [DONE], or a 503) get to go out.
CUT_GRACE_S = 2.0


class Drain:
    """The service's shutdown state: the streams under way (so that a drain that runs out can end
    each of them), the future that tells waiting requests to stop waiting, and ``hurry``."""

    def __init__(self, admission: Admission, access: Access) -> None:
        self.admission, self.access = admission, access
        # Streams under way, so that a drain that runs out can end each of them properly.
        self.streams: set[EventPump] = set()
        # Resolved when a drain runs out: requests still waiting for an answer stop waiting.
        self._cut: asyncio.Future[None] | None = None
        self._hurry: asyncio.Event | None = None

    def cut(self) -> asyncio.Future[None]:
        if self._cut is None:
            self._cut = asyncio.get_running_loop().create_future()
        return self._cut

    def _hurry_event(self) -> asyncio.Event:
        if self._hurry is None:
            self._hurry = asyncio.Event()
        return self._hurry

    async def drain(self, drain_s: float) -> int:
        """Shut down gracefully: refuse new requests (503) from now on, give those in progress up
        to ``drain_s`` to finish, then end the rest: an unfinished stream gets an error event
        (``shutting_down``) and [DONE], a request still waiting for its answer a 503. Returns how
        many were ended that way. ``hurry()`` (a second Ctrl-C) ends them at once."""
        self.admission.draining = True
        log.info("draining", extra={"event": "drain", "status": self.admission.in_flight})
        hurry = self._hurry_event()
        if await self.admission.wait_idle(drain_s, hurry):
            await self.access.settled()
            return 0
        cut = self.admission.in_flight
        log.warning("drain time over: ending %d request(s)", cut, extra={"event": "drain_cut", "status": cut})
        if not self.cut().done():
            self.cut().set_result(None)
        for stream in list(self.streams):
            stream.stop(ShuttingDown("the service is shutting down: the answer was cut short"))
        await self.admission.wait_idle(CUT_GRACE_S, asyncio.Event())
        await self.access.settled()
        return cut

    def hurry(self) -> None:
        """End a drain now: requests still in progress are ended as if the drain time had run out."""
        self._hurry_event().set()
