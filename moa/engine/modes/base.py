"""What every aggregation mode is to the engine: one method, ``propose``, which runs a run's
proposer stages and says what the final answer reads. The engine drives it without knowing which
mode it is, as httpx's send loop drives an auth flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from moa.engine.context import RunContext
from moa.errors import FallbackReason
from moa.result import Progress
from moa.types import TextDelta

# Where a mode's proposer stages tell the client how they stand, in the order things happen:
# Progress, and (a staircase) the answer's first text.
Emit = Callable[[Progress | TextDelta], None]


@dataclass(frozen=True)
class Proposed:
    """What the proposer stages leave the final answer: the last stage's answers (its references),
    or why a layer missed (the single-model fallback chain answers instead); and the answer's text
    already sent (a staircase's steps), which only the aggregators can continue."""

    references: list[str] = field(default_factory=list)
    missed: tuple[str, FallbackReason] | None = None
    prefix: str = ""


class Aggregation(Protocol):
    """An aggregation mode (``Plan.aggregation``): how a run's proposer stages run, up to the final
    answer. Yields what the client should see meanwhile, and ends with the ``Proposed``."""

    def propose(self, ctx: RunContext) -> AsyncGenerator[Progress | TextDelta | Proposed, None]: ...


async def pumped(
    ctx: RunContext, stages: Callable[[Emit], Awaitable[Proposed]]
) -> AsyncGenerator[Progress | TextDelta | Proposed, None]:
    """Run ``stages`` (a mode's proposer stages), yielding what they emit as it comes (their
    layers' Progress too, through ``ctx.progress``), then their ``Proposed``. Whatever ends the
    run (a failure, the client leaving) cancels the stages."""
    out: asyncio.Queue[Progress | TextDelta] = asyncio.Queue()
    ctx.progress = out.put_nowait
    task = asyncio.ensure_future(stages(out.put_nowait))
    getter: asyncio.Future[Progress | TextDelta] | None = None
    try:
        while not task.done():
            getter = getter or asyncio.ensure_future(out.get())
            waits: set[asyncio.Future[Any]] = {getter, task}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                got, getter = getter.result(), None
                yield got
        if getter is not None and getter.done():
            got, getter = getter.result(), None
            yield got
        while not out.empty():
            yield out.get_nowait()
        proposed = task.result()
    finally:
        ctx.progress = None
        if getter is not None and not getter.done():  # the run ended while waiting
            getter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    yield proposed
