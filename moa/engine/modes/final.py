"""``final`` aggregation: the proposer layers run one after the other, each waiting for its quorum
and then up to ``grace_s`` for the rest; a refine plan's rounds likewise, with a synthesis between
them. The final aggregator starts once the last stage is done.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from moa.engine.chain import synthesise
from moa.engine.context import RunContext
from moa.engine.layer import Grace, LayerJob, run_layer
from moa.engine.modes.base import Proposed, pumped
from moa.errors import FallbackReason
from moa.plan import Plan, PlanMode
from moa.result import Progress
from moa.types import TextDelta

_QUORUM_MISSED = FallbackReason.QUORUM_MISSED


class Final:
    """Stages in turn, each with its grace period."""

    def grace(self, plan: Plan) -> Grace:
        """How long a layer waits past its quorum."""
        return Grace(plan.grace_s, "grace period over")

    def propose(self, ctx: RunContext) -> AsyncGenerator[Progress | TextDelta | Proposed, None]:
        return pumped(ctx, lambda _emit: self._stages(ctx))

    async def _stages(self, ctx: RunContext) -> Proposed:
        plan = ctx.plan
        if plan.mode is PlanMode.REFINE:
            return await self._rounds(ctx)
        references: list[str] = []
        for index, layer in enumerate(plan.layers, start=1):
            outcome = await run_layer(ctx, LayerJob(index, layer, self.grace(plan), references))
            if not outcome.met:
                return Proposed(missed=(f"layer {index} missed its quorum", _QUORUM_MISSED))
            references, ctx.proposals = outcome.answers, outcome.answered
        return Proposed(references)

    async def _rounds(self, ctx: RunContext) -> Proposed:
        """A refine plan: its one layer, round after round, each improving the synthesis of the
        round before."""
        plan, references = ctx.plan, list[str]()
        layer = plan.layers[0]
        for rnd in range(1, plan.rounds + 1):
            prior = references if rnd > 1 else []
            job = LayerJob(rnd, layer, self.grace(plan), prior, refine=rnd > 1, round=rnd)
            outcome = await run_layer(ctx, job)
            if not outcome.met:
                return Proposed(missed=(f"round {rnd} missed its quorum", _QUORUM_MISSED))
            references, ctx.proposals = outcome.answers, outcome.answered
            if rnd < plan.rounds:
                synthesis = await synthesise(ctx, references, round_=rnd)
                if synthesis is None:
                    why = f"round {rnd} synthesis failed"
                    return Proposed(missed=(why, FallbackReason.SYNTHESIS_FAILED))
                references = [synthesis]
        return Proposed(references)
