"""One request deadline, in one form, on one clock.

A request crosses many boundaries (the API, the run, a layer's event loop, a call request and a
fusion job, the provider client); a deadline that changed form at each (relative seconds here,
absolute monotonic time there) would need a "has it passed" check of its own at each.
``Deadline`` is the one value: an instant on ``time.monotonic()`` (or none at all), asked how much
time is left (``remaining``), to bound a timeout (``cap``), whether it has passed (``expired``), or
to end the run if it has (``check``).

An instant on the monotonic clock means nothing in another process, so a deadline crosses a process
boundary (a Ray handle call: ``CallRequest``, ``FuseJob``) as the seconds it has left, and is rebuilt
on the other side with ``Deadline.after``; the time in transit is what the other side then lacks.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from moa.errors import DeadlineExceeded


@dataclass(frozen=True)
class Deadline:
    """An instant on ``time.monotonic()``; ``at=None`` is no deadline at all."""

    at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """The deadline ``seconds`` from now (none for None): how a deadline is made, or rebuilt
        from the seconds it had left when it crossed a process boundary."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left (zero or negative once passed; infinite without a deadline)."""
        return math.inf if self.at is None else self.at - time.monotonic()

    def to_wire(self) -> float | None:
        """The form in which a deadline crosses a process boundary: the seconds it has left, or
        None without one. ``Deadline.after`` rebuilds it on the other side."""
        return None if self.at is None else self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def cap(self, timeout: float) -> float:
        """``timeout``, shortened to the time left (which may be zero or negative once passed)."""
        return min(timeout, self.remaining())

    def within(self, seconds: float) -> Deadline:
        """The earlier of this deadline and ``seconds`` from now (a layer's own deadline, say)."""
        now = time.monotonic()
        return Deadline(now + seconds if self.at is None else min(self.at, now + seconds))

    def extended(self, seconds: float) -> Deadline:
        """This deadline, ``seconds`` later (a backstop past the engine's own deadline, say)."""
        return self if self.at is None else Deadline(self.at + seconds)

    def no_later_than(self, other: Deadline) -> bool:
        """Whether this deadline comes at or before ``other`` (no deadline comes last)."""
        if other.at is None:
            return True
        return self.at is not None and self.at <= other.at

    def check(self, message: str = "the request deadline passed before an answer was ready") -> None:
        """Raise ``DeadlineExceeded`` (504) when the deadline has passed."""
        if self.expired:
            raise DeadlineExceeded(message)

    def loop_time(self) -> float | None:
        """This instant on the running event loop's clock, for ``asyncio.timeout_at``; whatever the
        loop's clock is, the instant stays the same."""
        if self.at is None:
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + (self.at - time.monotonic())


NO_DEADLINE = Deadline()
