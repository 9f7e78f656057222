"""Staircase aggregation: every layer streams, and each stage after the first writes in steps.

A streaming layer's answers go into a ``StaircaseFeed`` as they are written. Whatever reads a
layer (a proposer of the next layer, or the final aggregator after the last) is a *stepped writer*
over that feed (``climb``): its step k starts once the layer's quorum has reached its k-th
boundary (or finished), sees each answer up to that boundary (a finished one whole) and its own
answer so far, and continues that answer for at most ``staircase_step_tokens``. After at most
``staircase_steps`` steps, the writer's last step waits for the layer to be done (its quorum and
grace, as in ``final``) and finishes from the whole answers.

A layer's boundaries come every ``staircase_chunk_chars`` of each answer, and, where the layer's
proposers write in steps themselves (every layer after the first), also at the end of each step,
the next chunk counting from there. A step writes at most ``staircase_step_tokens``, less than a
chunk at the defaults: with chunks alone, the stage after would wait for two steps of the layer
before (and their two waits for the layer before that) where one will do. So each stage's step k
starts as soon as the stage before it has written its step k.

The final aggregator's text goes to the client; a later-layer proposer's text goes into its own
layer's feed (``stepped_proposer``), so the stage after it can start on it in turn. One mechanism
for both: the same ``climb`` and the same answer-continuing call (``chain.staircase_step``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from moa.engine.chain import Part, Writer, answer_chain, staircase_step
from moa.engine.context import RunContext
from moa.engine.layer import LayerOutcome, uncalled
from moa.plan import ProposerSpec
from moa.result import Stage
from moa.types import CallResult, ErrorKind, StreamEvent, TextDelta


@dataclass(frozen=True)
class StepEnd:
    """A stepped proposer finished an intermediate step: its answer so far is the next boundary of
    its layer's feed."""


class StaircaseFeed:
    """One layer's answers so far, shared by its streaming proposer calls and every writer reading
    it. Any number of readers may wait on it: each change wakes them all.

    ``marks[i]`` holds the boundaries proposer i's answer reached so far, in characters: one every
    ``chunk_chars`` past the one before, and one at each ``StepEnd`` it wrote."""

    def __init__(self, proposers: int, needed: int, chunk_chars: int) -> None:
        self.texts = [""] * proposers
        self.marks: list[list[int]] = [[] for _ in range(proposers)]
        self.needed = needed
        self.chunk_chars = chunk_chars
        self.succeeded: set[int] = set()
        self.failed: set[int] = set()
        self.closed = False
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        # A fresh event per change: every reader waiting on the old one wakes, none can miss it.
        self._changed.set()
        self._changed = asyncio.Event()

    async def consume(self, index: int, events: AsyncIterator[StreamEvent | StepEnd]) -> CallResult:
        """Stream one proposer's answer into the feed; its final result is the call's result."""
        result: CallResult | None = None
        texts, marks, chunk = self.texts, self.marks[index], self.chunk_chars
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    texts[index] += ev.text
                    while len(texts[index]) >= (last := marks[-1] if marks else 0) + chunk:
                        marks.append(last + chunk)
                elif isinstance(ev, StepEnd):
                    marks.append(len(texts[index]))
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

    def ready(self, k: int) -> bool:
        """Whether a step up to the ``k``-th boundary can start: the quorum reached it (or has
        finished), and some proposer is still writing (otherwise the last step is next)."""
        if self.running == 0:
            return False
        reached = sum(
            1
            for i, marks in enumerate(self.marks)
            if i not in self.failed and (len(marks) >= k or i in self.succeeded)
        )
        return reached >= self.needed

    async def reach(self, k: int) -> bool:
        """Wait until a step up to the ``k``-th boundary can start (True) or the layer stopped
        writing (False: only the last step, over the whole answers, is left)."""
        while not self.ready(k):
            if self.running == 0:
                return False
            await self._changed.wait()
        return True

    def partial(self, k: int) -> list[str]:
        """Each answer still in the running, up to its ``k``-th boundary (all of it so far, if it
        has not reached that boundary); an answer that finished, whole."""
        return [
            text if i in self.succeeded or len(marks) < k else text[: marks[k - 1]]
            for i, (text, marks) in enumerate(zip(self.texts, self.marks, strict=True))
            if i not in self.failed and text
        ]


async def climb(
    ctx: RunContext, writer: Writer, source: StaircaseFeed
) -> AsyncGenerator[TextDelta | CallResult, None]:
    """``writer``'s intermediate steps over ``source``: yields each step's deltas and result.

    Returns once ``staircase_steps`` steps ran, the layer stopped writing, or a step failed (its
    failed result is yielded last: a proposer that fails a step is a failed proposer). What comes
    next, the last step over the whole answers, is the caller's: it differs between the final
    aggregator (its routes and fallbacks) and a proposer (one model, a layer's quorum).
    """
    answer = ""
    for k in range(1, ctx.plan.staircase_steps + 1):
        if not await source.reach(k):
            return
        async with aclosing(staircase_step(ctx, writer, source.partial(k), answer, k)) as events:
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
) -> AsyncIterator[StreamEvent | StepEnd]:
    """A proposer of layer ``layer`` (>= 2) as a stepped writer over the layer before it.

    Its steps read ``source`` as that layer writes; its last step waits for ``upstream`` (that
    layer's outcome: quorum and grace, as in ``final``) and finishes from the whole answers. Every
    step is a call recorded with its layer and ``staircase_step``. Yields the answer's deltas
    (into this layer's feed), a ``StepEnd`` after each intermediate step, and ends with one
    result, the last step's (the whole answer) or the failure that ended it, so the layer counts
    it as any proposer's.
    """
    writer = Writer(chain=(spec,), stage=Stage.PROPOSER, layer=layer, role=spec.role)
    answer = ""
    steps = climb(ctx, writer, source)
    async with aclosing(steps):
        async for ev in steps:
            if isinstance(ev, TextDelta):
                answer += ev.text
                yield ev
            elif ev.ok:
                yield StepEnd()  # a boundary for the stage that reads this layer
            else:
                yield ev
                return
    # Waited on, never awaited directly: cancelling this proposer must not cancel that layer.
    await asyncio.wait({upstream})
    outcome = upstream.result()
    if not outcome.met:  # the run falls back; this layer is about to be cancelled
        yield uncalled(ctx, spec, ErrorKind.CANCELLED, f"layer {layer - 1} missed its quorum")
        return
    final: CallResult | None = None
    last = answer_chain(ctx, writer, outcome.answers, stream=True, part=Part(prefix=answer))
    async with aclosing(last):
        async for res in last:
            if isinstance(res, TextDelta):
                yield res
            else:
                final = res
    assert final is not None  # a proposer's chain yields its result, failed or not
    yield final
