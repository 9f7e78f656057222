"""Staircase aggregation: the last layer's proposers stream, and the aggregator writes in steps.

Step k starts once the quorum of proposers has written k chunks (``staircase_chunk_chars`` each)
or finished; it sees each answer up to that boundary and the answer written so far, continues it
for at most ``staircase_step_tokens``, and its tokens go to the client at once. When the layer is
done (its quorum and grace, as in ``final``) the last step reads the whole answers and finishes.
This holds the proposers' answers as they stream; ``MoAEngine`` runs the steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from moa.types import CallResult, StreamEvent, TextDelta


class StaircaseFeed:
    """The last layer's answers so far, shared by its streaming proposer calls and the steps."""

    def __init__(self, proposers: int, needed: int) -> None:
        self.texts = [""] * proposers
        self.needed = needed
        self.succeeded: set[int] = set()
        self.failed: set[int] = set()
        self.changed = asyncio.Event()

    async def consume(self, index: int, events: AsyncIterator[StreamEvent]) -> CallResult:
        """Stream one proposer's answer into the feed; its final result is the call's result."""
        result: CallResult | None = None
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    self.texts[index] += ev.text
                else:
                    result = ev
                self.changed.set()
        finally:
            if result is not None and result.ok:
                self.succeeded.add(index)
            else:
                self.failed.add(index)
            self.changed.set()
        assert result is not None  # safe_stream always ends with one
        return result

    def ready(self, boundary: int) -> bool:
        """Whether a step up to ``boundary`` characters can start: the quorum has that much (or
        has finished), and some proposer is still writing (otherwise the last step is next)."""
        running = len(self.texts) - len(self.succeeded) - len(self.failed)
        if running == 0:
            return False
        reached = sum(
            1
            for i, text in enumerate(self.texts)
            if i not in self.failed and (len(text) >= boundary or i in self.succeeded)
        )
        return reached >= self.needed

    def partial(self, boundary: int) -> list[str]:
        """Each answer still in the running, up to ``boundary`` characters."""
        return [text[:boundary] for i, text in enumerate(self.texts) if i not in self.failed and text]
