"""Staircase aggregation: every layer streams, and each stage after the first writes in steps.

A streaming layer's answers go into a ``StaircaseFeed`` as they are written. Whatever reads a
layer (a proposer of the next layer, or the final aggregator after the last) is a *stepped writer*
over that feed (``climb``): its step k starts once the layer's quorum has written k chunks
(``staircase_chunk_chars`` each) or finished, sees each answer up to that boundary and its own
answer so far, and continues that answer for at most ``staircase_step_tokens``. After at most
``staircase_steps`` steps, the writer's last step waits for the layer to be done (its quorum and
grace, as in ``final``) and finishes from the whole answers.

The final aggregator's text goes to the client; a later-layer proposer's text goes into its own
layer's feed (``stepped_proposer``), so the stage after it can start on it in turn. One mechanism
for both: the same ``climb`` and the same answer-continuing call (``chain.staircase_step``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

from moa.engine.calls import provider_kind
from moa.engine.chain import Writer, answer_chain, staircase_step
from moa.engine.context import RunContext
from moa.engine.plan import Plan, ProposerSpec
from moa.engine.result import Stage
from moa.types import CallError, CallResult, ErrorKind, StreamEvent, TextDelta

if TYPE_CHECKING:
    from moa.engine.layer import LayerOutcome

# One step of a stepped writer: (the layer's answers up to the boundary, the answer so far, the
# step's number) -> the step's deltas, then its result (a failed result ends the writer).
StepFn = Callable[[list[str], str, int], AsyncGenerator[TextDelta | CallResult, None]]


class StaircaseFeed:
    """One layer's answers so far, shared by its streaming proposer calls and every writer reading
    it. Any number of readers may wait on it: each change wakes them all."""

    def __init__(self, proposers: int, needed: int) -> None:
        self.texts = [""] * proposers
        self.needed = needed
        self.succeeded: set[int] = set()
        self.failed: set[int] = set()
        self.closed = False
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        # A fresh event per change: every reader waiting on the old one wakes, none can miss it.
        self._changed.set()
        self._changed = asyncio.Event()

    async def consume(self, index: int, events: AsyncIterator[StreamEvent]) -> CallResult:
        """Stream one proposer's answer into the feed; its final result is the call's result."""
        result: CallResult | None = None
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    self.texts[index] += ev.text
                else:
                    result = ev
                self._bump()
        finally:
            if result is not None and result.ok:
                self.succeeded.add(index)
            else:
                self.failed.add(index)
            self._bump()
        assert result is not None  # safe_stream and stepped_proposer always end with one
        return result

    def close(self) -> None:
        """No more text will come (the layer is over, or will never run): readers stop waiting."""
        self.closed = True
        self._bump()

    @property
    def running(self) -> int:
        return 0 if self.closed else len(self.texts) - len(self.succeeded) - len(self.failed)

    def ready(self, boundary: int) -> bool:
        """Whether a step up to ``boundary`` characters can start: the quorum has that much (or
        has finished), and some proposer is still writing (otherwise the last step is next)."""
        if self.running == 0:
            return False
        reached = sum(
            1
            for i, text in enumerate(self.texts)
            if i not in self.failed and (len(text) >= boundary or i in self.succeeded)
        )
        return reached >= self.needed

    async def reach(self, boundary: int) -> bool:
        """Wait until a step up to ``boundary`` can start (True) or the layer stopped writing
        (False: only the last step, over the whole answers, is left)."""
        while not self.ready(boundary):
            if self.running == 0:
                return False
            await self._changed.wait()
        return True

    def partial(self, boundary: int) -> list[str]:
        """Each answer still in the running, up to ``boundary`` characters."""
        return [text[:boundary] for i, text in enumerate(self.texts) if i not in self.failed and text]


async def climb(
    plan: Plan, source: StaircaseFeed, step: StepFn
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """A stepped writer's intermediate steps over ``source``: yields each step's deltas and result.

    Returns once ``staircase_steps`` steps ran, the layer stopped writing, or a step failed (its
    failed result is yielded last: a proposer that fails a step is a failed proposer). What comes
    next, the last step over the whole answers, is the caller's: it differs between the final
    aggregator (its routes and fallbacks) and a proposer (one model, a layer's quorum).
    """
    answer = ""
    for k in range(1, plan.staircase_steps + 1):
        boundary = k * plan.staircase_chunk_chars
        if not await source.reach(boundary):
            return
        async with aclosing(step(source.partial(boundary), answer, k)) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    answer += ev.text
                yield ev
                if isinstance(ev, CallResult) and not ev.ok:
                    return


async def stepped_proposer(
    ctx: RunContext,
    layer: int,
    spec: ProposerSpec,
    source: StaircaseFeed,
    upstream: asyncio.Future[LayerOutcome],
) -> AsyncIterator[StreamEvent]:
    """A proposer of layer ``layer`` (>= 2) as a stepped writer over the layer before it.

    Its steps read ``source`` as that layer writes; its last step waits for ``upstream`` (that
    layer's outcome: quorum and grace, as in ``final``) and finishes from the whole answers. Every
    step is a call recorded with its layer and ``staircase_step``. Yields the answer's deltas
    (into this layer's feed) and ends with one result, the last step's (the whole answer) or the
    failure that ended it, so the layer counts it as any proposer's.
    """
    writer = Writer(chain=(spec,), stage=Stage.PROPOSER, layer=layer, role=spec.role)
    answer = ""
    steps = climb(ctx.plan, source, lambda refs, so_far, k: staircase_step(ctx, writer, refs, so_far, k))
    async with aclosing(steps):
        async for ev in steps:
            if isinstance(ev, TextDelta):
                answer += ev.text
                yield ev
            elif not ev.ok:
                yield ev
                return
    # Waited on, never awaited directly: cancelling this proposer must not cancel that layer.
    await asyncio.wait({upstream})
    outcome = upstream.result()
    if not outcome.met:  # the run falls back; this layer is about to be cancelled
        yield cancelled_result(ctx, spec, f"layer {layer - 1} missed its quorum")
        return
    final: CallResult | None = None
    last = answer_chain(
        ctx,
        writer.chain,
        writer.stage,
        outcome.answers,
        stream=True,
        prefix=answer,
        layer=layer,
        role=spec.role,
    )
    async with aclosing(last):
        async for res in last:
            if isinstance(res, TextDelta):
                yield res
            else:
                final = res
    assert final is not None  # a proposer's chain yields its result, failed or not
    yield final


def cancelled_result(ctx: RunContext, spec: ProposerSpec, why: str) -> CallResult:
    """A proposer that did not run to its end, for a reason of the run's, not the provider's."""
    return CallResult(
        provider=spec.provider,
        provider_kind=provider_kind(ctx.config, spec.provider),
        requested_model=spec.model,
        error=CallError(kind=ErrorKind.CANCELLED, message=why),
    )
