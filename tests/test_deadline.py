"""The one request deadline: its arithmetic, its check, and how it crosses a process boundary."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from moa.deadline import NO_DEADLINE, Deadline
from moa.errors import DeadlineExceeded


def test_a_deadline_counts_down_and_then_refuses() -> None:
    d = Deadline.after(10)
    assert 9 < d.remaining() <= 10 and not d.expired
    d.check()  # not passed: nothing raised
    passed = Deadline(time.monotonic() - 1)
    assert passed.expired and passed.remaining() < 0
    with pytest.raises(DeadlineExceeded, match="in layer 2"):
        passed.check("the request deadline passed in layer 2")


def test_no_deadline_never_passes_and_caps_nothing() -> None:
    assert NO_DEADLINE.remaining() == math.inf and not NO_DEADLINE.expired
    assert NO_DEADLINE.cap(5.0) == 5.0
    assert NO_DEADLINE.to_wire() is None and Deadline.after(NO_DEADLINE.to_wire()) == NO_DEADLINE
    NO_DEADLINE.check()


def test_cap_and_within_take_the_earlier() -> None:
    d = Deadline.after(2)
    assert d.cap(60) <= 2 and d.cap(0.5) == 0.5
    assert d.within(60).at == d.at  # the request's deadline comes first
    layer = d.within(0.5)
    assert layer.at is not None and d.at is not None and layer.at < d.at
    assert layer.no_later_than(d) and not d.no_later_than(layer)
    assert d.no_later_than(NO_DEADLINE) and not NO_DEADLINE.no_later_than(d)
    assert d.extended(1).at == d.at + 1


def test_it_crosses_a_process_boundary_as_seconds_left() -> None:
    d = Deadline.after(3)
    wire = d.to_wire()
    assert wire is not None and 2 < wire <= 3
    rebuilt = Deadline.after(wire)
    assert rebuilt.at is not None and d.at is not None and abs(rebuilt.at - d.at) < 0.1


async def test_it_bounds_an_await_on_the_loop_clock() -> None:
    d = Deadline.after(0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout_at(d.loop_time()):
            await asyncio.sleep(5)
    assert d.expired
