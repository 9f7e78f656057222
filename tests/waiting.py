"""Waiting on conditions instead of clocks.

A test that sleeps a fixed time and then counts, or asserts that something took less than N
seconds, proves nothing on a loaded machine: a red run may only mean the machine was busy. These
helpers poll a condition until it holds, with a timeout generous enough that only a real failure
reaches it; the timeout is a safety net, never the claim. Speed is measured by ``moa bench``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Long enough that a busy two-CPU machine never reaches it while the condition is on its way.
TIMEOUT_S = 30.0


class ConditionTimeout(AssertionError):
    """The condition never held; the message says what was waited for and the last value seen."""


def _fail(what: str, last: object, timeout: float) -> ConditionTimeout:
    return ConditionTimeout(f"waited {timeout:g} s for {what}; last seen: {last!r}")


def wait_until_sync(
    probe: Callable[[], T],
    condition: Callable[[T], object] = bool,
    *,
    within_s: float = TIMEOUT_S,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Call ``probe`` until ``condition(value)`` holds; return that value, or raise after ``within_s``."""
    end = time.monotonic() + within_s
    while True:
        value = probe()
        if condition(value):
            return value
        if time.monotonic() > end:
            raise _fail(what, value, within_s)
        time.sleep(interval)


async def wait_until(
    probe: Callable[[], T | Awaitable[T]],
    condition: Callable[[T], object] = bool,
    *,
    within_s: float = TIMEOUT_S,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """The async twin of ``wait_until_sync``: ``probe`` may be a plain or an async function.

    A plain ``probe`` may block briefly (a loopback HTTP call to the simulator, which runs on its
    own thread); the event loop sleeps between probes so the code under test keeps running.
    """
    end = time.monotonic() + within_s
    while True:
        got = probe()
        value: T = await got if inspect.isawaitable(got) else got  # type: ignore[assignment]
        if condition(value):
            return value
        if time.monotonic() > end:
            raise _fail(what, value, within_s)
        await asyncio.sleep(interval)
