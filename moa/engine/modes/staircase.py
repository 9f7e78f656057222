"""``staircase`` aggregation (streamed layered plans): every layer starts at once and streams into
its feed; each layer after the first steps over the one before it, and the final aggregator steps
over the last, its steps' text going to the client while the proposers still write. The feed and
the stepped writers are ``moa.engine.staircase``; this module runs them as a mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Collection, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from moa.engine.calls import safe_stream
from moa.engine.chain import Writer
from moa.engine.context import RunContext
from moa.engine.layer import DirectCalls, LayerJob, LayerOutcome, Proposers, Tasks, run_layer, uncalled
from moa.engine.modes.base import Emit, Proposed, pumped
from moa.engine.modes.final import Final
from moa.engine.staircase import StaircaseFeed, climb, stepped_proposer
from moa.errors import FallbackReason
from moa.result import Progress, Stage
from moa.types import CallRequest, CallResult, ErrorKind, TextDelta


class Staircase:
    """All layers at once, each later stage stepping over the one before."""

    def propose(self, ctx: RunContext) -> AsyncGenerator[Progress | TextDelta | Proposed, None]:
        return pumped(ctx, lambda emit: self._stages(ctx, emit))

    async def _stages(self, ctx: RunContext, emit: Emit) -> Proposed:
        """The layers, and the final aggregator's intermediate steps over the last one. A step that
        fails after its text went out ends the run at once; a layer that misses its quorum ends
        the layers, and the steps then stop at their next boundary."""
        plan = ctx.plan
        chunk = plan.staircase_chunk_chars
        feeds = [StaircaseFeed(len(layer.proposers), layer.needed, chunk) for layer in plan.layers]
        layers = asyncio.create_task(_layers(ctx, feeds))
        climber = asyncio.create_task(_aggregator_steps(ctx, feeds[-1], emit))
        tasks = (layers, climber)
        try:
            while running := [t for t in tasks if not t.done()]:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if climber.done():
                    climber.result()  # a step that failed after its text went out ends the run
            references, missed = layers.result()
            return Proposed(references, missed, climber.result())
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _aggregator_steps(ctx: RunContext, feed: StaircaseFeed, emit: Emit) -> str:
    """The final aggregator's intermediate steps over the last layer's ``feed``; their text goes to
    the client. Returns the answer they wrote."""
    writer = Writer(chain=ctx.plan.aggregators, stage=Stage.AGGREGATOR)
    written: list[str] = []
    async with aclosing(climb(ctx, writer, feed)) as steps:
        async for ev in steps:
            if isinstance(ev, TextDelta):
                written.append(ev.text)
                emit(ev)
    return "".join(written)


async def _layers(
    ctx: RunContext, feeds: Sequence[StaircaseFeed]
) -> tuple[list[str], tuple[str, FallbackReason] | None]:
    """All layers at once, each after the first stepping over the one before it. The first layer
    to miss its quorum (a later one may know first: its own proposers failed) sends the run to its
    fallback chain, and every layer still running is cancelled."""
    grace = Final().grace(ctx.plan)
    layers: list[asyncio.Task[LayerOutcome]] = []
    try:
        for index, layer in enumerate(ctx.plan.layers, start=1):
            feed = feeds[index - 1]
            proposers: Proposers = FeedCalls(feed)
            if layers:  # every layer after the first steps over the one before it
                proposers = SteppedCalls(feed, Upstream(feeds[index - 2], layers[-1]))
            layers.append(asyncio.create_task(run_layer(ctx, LayerJob(index, layer, grace), proposers)))
        while True:
            for index, task in enumerate(layers, start=1):
                if task.done() and not task.result().met:
                    return [], (f"layer {index} missed its quorum", FallbackReason.QUORUM_MISSED)
            running = [t for t in layers if not t.done()]
            if not running:
                last = layers[-1].result()
                ctx.proposals = last.answered
                return last.answers, None
            # Whichever layer ends first is looked at: a later one can miss its quorum first.
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in layers:
            if not task.done():
                task.cancel()
        await asyncio.gather(*layers, return_exceptions=True)
        for feed in feeds:  # a layer cancelled before it started never wrote: stop its readers
            feed.close()


class FeedCalls(DirectCalls):
    """The first layer's proposers: asked once each, their answers streaming into the layer's feed
    as they are written (read as they come: not batched, and not through the proposal cache)."""

    batch_s = None

    def __init__(self, feed: StaircaseFeed) -> None:
        super().__init__()
        self.feed = feed

    def call(self, req: CallRequest, i: int) -> Coroutine[Any, Any, CallResult]:
        return self.feed.consume(i, safe_stream(self.ctx.caller, self.ctx.config, req))

    def text(self, i: int) -> str:
        return self.feed.texts[i]


@dataclass
class Upstream:
    """The layer before a stepped layer: its answers as they stream, and its outcome to come."""

    feed: StaircaseFeed
    outcome: asyncio.Future[LayerOutcome]


class SteppedCalls:
    """A later layer's proposers: each a stepped writer over the layer before (``stepped_proposer``),
    streaming into this layer's feed. They start at once; the layer's own clock (its deadline)
    starts when the layer they read is done. Each step is a call its chain records and bills."""

    recorded = True

    def __init__(self, feed: StaircaseFeed, upstream: Upstream) -> None:
        self.feed, self.upstream = feed, upstream

    async def start(self, ctx: RunContext, job: LayerJob, clock: Callable[[], float]) -> Tasks:
        self.ctx, self.job = ctx, job
        tasks: Tasks = {}
        for i, spec in enumerate(job.spec.proposers):
            writer = stepped_proposer(ctx, job.index, spec, self.upstream.feed, self.upstream.outcome)
            tasks[asyncio.create_task(self.feed.consume(i, writer))] = i
        try:
            await _upstream_done(self.upstream, tasks, len(job.spec.proposers) - job.spec.needed)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        clock()
        return tasks

    def cut(self, i: int, kind: ErrorKind, why: str, latency_s: float) -> CallResult:
        """A stepped proposer cut: its steps were billed by its chain; this only says it was cut."""
        return uncalled(self.ctx, self.job.spec.proposers[i], kind, why, latency_s)


async def _upstream_done(upstream: Upstream, tasks: Collection[asyncio.Task[CallResult]], spare: int) -> None:
    """Wait for the layer ``upstream`` to be done, or until more than ``spare`` of this layer's
    stepped proposers failed: its quorum is then out of reach whatever that layer does, and the
    layer stops at once, as any layer does (the run falls back)."""
    running = set(tasks)
    while not upstream.outcome.done():
        failed = sum(1 for t in tasks if t.done() and (t.cancelled() or t.exception() or not t.result().ok))
        if failed > spare:
            return
        running = {t for t in running if not t.done()}
        waits: set[asyncio.Future[Any]] = {upstream.outcome, *running}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
