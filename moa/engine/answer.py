"""The final answer of a run, once its proposer stages are done (``Proposed``): the routes to it
(the aggregators, the fallback chain), tried in order, and the best proposal when every route
failed after the proposers answered; then the ``MoAResult`` that says how it was reached.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from opentelemetry import trace

from moa.engine import spans, structured
from moa.engine.chain import Part, Writer, answer_chain
from moa.engine.context import RunContext
from moa.engine.modes import Proposed
from moa.engine.toolcalls import Vote, check, vote
from moa.errors import FallbackReason
from moa.plan import ModelRef
from moa.result import AnswerSource, CallRecord, MoAResult, Stage
from moa.types import CallResult, TextDelta, ToolSet


@dataclass
class Route:
    """One way to the final answer: a chain of models tried in order, and why it is taken."""

    chain: Sequence[ModelRef]
    stage: Stage
    references: list[str]
    reason: str | None = None
    reason_kind: FallbackReason | None = None


def routes(ctx: RunContext, proposed: Proposed) -> tuple[list[Route], FallbackReason | None]:
    """The routes to try, in order, and why a proposal may answer once they all failed (None: it
    may not)."""
    plan = ctx.plan
    if proposed.prefix:
        # Staircase steps already sent text: only the aggregators can continue it.
        if proposed.missed is not None:
            ctx.note(f"{proposed.missed[0]} after the staircase had started answering")
            ctx.raise_failed()
        return [Route(plan.aggregators, Stage.AGGREGATOR, proposed.references)], None
    policy = plan.on_aggregators_failed
    if proposed.missed is not None:
        # A layer missed its quorum: the single-model fallback chain answers instead.
        ctx.deadline.check()
        why, kind = proposed.missed
        ctx.fallback_reason = kind
        ctx.note(f"{why}; falling back to a single model")
        fallback = [Route(plan.fallbacks, Stage.FALLBACK, [], why, kind)]
        if kind is FallbackReason.SYNTHESIS_FAILED and policy != "fail":
            # The round's proposers answered; only its synthesis failed.
            return ([] if policy == "proposal" else fallback), kind
        return fallback, None
    found = [Route(plan.aggregators, Stage.AGGREGATOR, proposed.references)]
    if plan.fallbacks and not plan.is_single and policy == "fallbacks":
        why = "every aggregator failed"
        found.append(Route(plan.fallbacks, Stage.FALLBACK, [], why, FallbackReason.AGGREGATORS_FAILED))
    salvage = FallbackReason.AGGREGATORS_FAILED if policy != "fail" and not plan.is_single else None
    return found, salvage


async def answer(ctx: RunContext, proposed: Proposed) -> AsyncGenerator[TextDelta | MoAResult, None]:
    """The final answer: the first route whose chain succeeds. When every route failed and a
    proposal may answer (every aggregator failed after the proposers answered), the best proposal
    the run has answers; otherwise every failure is listed. A staircase's ``proposed.prefix`` is
    the answer's text already sent, which the chain continues.

    A route that fails after its text went out ends the run inside its chain (text cannot be
    retracted), so a proposal only ever answers a run whose client has seen nothing yet."""
    found, salvage = routes(ctx, proposed)
    if proposed.missed is None and (ctx.tools is not None or ctx.proposers_formatted):
        voted = decided_by_vote(ctx)
        if voted is not None:
            for out in replayed(ctx, voted, None, None, "vote"):
                yield out
            return
    part = Part(prefix=proposed.prefix)
    for i, route in enumerate(found):
        later = sum(len(r.chain) for r in found[i + 1 :])
        writer = Writer(chain=route.chain, stage=route.stage)
        chain = answer_chain(ctx, writer, route.references, stream=ctx.stream, later=later, part=part)
        source: AnswerSource = "fallback" if route.stage is Stage.FALLBACK else "aggregator"
        async with aclosing(chain):
            async for ev in chain:
                if isinstance(ev, CallResult):
                    for out in replayed(ctx, ev, route.reason, route.reason_kind, source):
                        yield out
                    return
                yield ev
    proposals = ctx.proposals
    contract = ctx.contract
    if contract.binding:  # only a proposal that keeps the contract may answer (its document bare)
        proposals = [v.result for v in map(contract.check, proposals) if v.ok]
    best = best_proposal(proposals) if salvage is not None else None
    if best is None or salvage is None:
        ctx.raise_failed()
        return
    # Paid for, and in hand: answered as it was written rather than thrown away with an error.
    name = f"{best.provider}/{best.requested_model}"
    why = f"every aggregator failed; answered with the best proposal ({name})"
    ctx.fallback_reason = salvage
    ctx.note(f"{why}: the first in the layer's order that finished on its own, else the first")
    if ctx.stream or ctx.replay:
        for piece in replay_pieces(best.text):
            yield TextDelta(text=piece)
    yield result(ctx, best, why, salvage, "proposal")


def decided_by_vote(ctx: RunContext) -> CallResult | None:
    """The proposal whose calls (or, proposers asked for the response format, whose document) a
    quorum of the last layer agreed on, when the run votes and the answer keeps the contract
    (None: the aggregators decide). What the vote saw is kept on the run."""
    tools, plan = ctx.tools, ctx.plan
    if not plan.layers or not ctx.proposals:
        return None
    needed = max(min(plan.layers[-1].needed, len(ctx.proposals)), 1)
    if tools is None:
        return _document_voted(ctx, needed)
    polled = vote(ctx.proposals, needed)
    seen = ctx.vote = polled.outcome
    try:
        return _decided(ctx, polled, tools)
    finally:
        spans.tool_vote(trace.get_current_span(), seen)


def _document_voted(ctx: RunContext, needed: int) -> CallResult | None:
    """The document a quorum of the proposals wrote, if it passes validation."""
    polled = structured.vote(ctx.proposals, needed)
    seen = ctx.document_vote = polled.outcome
    spans.tool_vote(trace.get_current_span(), seen, "moa.structured")
    if polled.winner is None:
        ctx.note(f"document vote: {seen.reason}; the aggregator decides")
        return None
    verdict = ctx.contract.check(polled.winner)
    if not verdict.ok:
        seen.decided = False
        seen.reason = f"{verdict.about}: " + "; ".join(verdict.violations)
        ctx.note(f"document vote: {seen.reason}; the aggregator decides")
        return None
    ctx.note(f"document vote: {seen.agreed} of {seen.proposals} proposals wrote it; no aggregator call")
    return verdict.result


def _decided(ctx: RunContext, polled: Vote, tools: ToolSet) -> CallResult | None:
    seen = polled.outcome
    if ctx.tool_mode != "vote":
        seen.decided, seen.reason = False, "tool mode aggregate: the aggregator decides"
        return None
    if polled.winner is None:
        ctx.note(f"tool vote: {seen.reason}; the aggregator decides")
        return None
    verdict = check(polled.winner, tools)
    if not verdict.ok:
        seen.decided = False
        seen.reason = "the agreed calls break the tools' contract: " + "; ".join(verdict.violations)
        ctx.note(f"tool vote: {seen.reason}; the aggregator decides")
        return None
    ctx.note(f"tool vote: {seen.agreed} of {seen.proposals} proposals agree; no aggregator call")
    return polled.winner


def replayed(
    ctx: RunContext,
    final: CallResult,
    fallback: str | None,
    fallback_reason: FallbackReason | None,
    source: AnswerSource,
) -> list[TextDelta | MoAResult]:
    """The run's result, preceded (for a streaming client whose answer was held until it was
    decided: a request with tools) by its text in pieces."""
    pieces: list[TextDelta | MoAResult] = []
    if ctx.replay and final.text:
        pieces = [TextDelta(text=piece) for piece in replay_pieces(final.text)]
    return [*pieces, result(ctx, final, fallback, fallback_reason, source)]


def best_proposal(answered: Sequence[CallResult]) -> CallResult | None:
    """The proposal a run answers with when its aggregators all failed: the first, in the layer's
    proposer order, whose answer finished on its own (``stop``: not cut at its token limit), else
    the first. The order is the plan's, which lists the proposers as the operator ranks them; no
    reading of the texts is attempted, so the rule is the same for every model and language."""
    usable = [r for r in answered if r.ok and (r.text or r.tool_calls)]
    complete = [r for r in usable if r.finish_reason in ("stop", "tool_calls")]
    ranked = complete or usable
    return ranked[0] if ranked else None


def result(
    ctx: RunContext,
    final: CallResult,
    fallback: str | None,
    fallback_reason: FallbackReason | None,
    source: AnswerSource = "aggregator",
) -> MoAResult:
    """The run's result, answered by ``final`` (``fallback`` and its kind say why not by the
    aggregators, when it was not)."""
    usage = sum((r.usage for r in ctx.records), start=type(final.usage)())
    return MoAResult(
        text=final.text,
        tool_calls=final.tool_calls,
        tool_vote=ctx.vote,
        refusal=final.refusal,
        document_vote=ctx.document_vote,
        preset=ctx.decision.preset,
        plan=ctx.plan,
        decision=ctx.decision,
        provider=final.provider,
        model=final.model or final.requested_model,
        finish_reason=final.finish_reason,
        calls=ctx.records,
        usage=usage,
        cost_usd=sum(r.cost_usd for r in ctx.records),
        wall_time_s=ctx.offset(),
        critical_path_s=critical_path(ctx.records),
        provider_critical_path_s=ctx.provider_critical_s,
        fallback=fallback,
        fallback_reason=fallback_reason,
        answer_source=source,
        notes=ctx.notes,
    )


def critical_path(records: Sequence[CallRecord]) -> float:
    """The time the run spent waiting on its model calls: the length of the union of the calls'
    intervals, from when each really started to when it ended (or was cut).

    Taken from when calls ran, not added up stage by stage: a staircase step, an ``early`` run's
    straggler or a later layer stepping over the one before all run beside other calls, and a
    sum would count those seconds twice. So it never exceeds the wall time; what the run spent
    between calls is its own overhead."""
    spans = sorted((r.started_s, r.started_s + r.latency_s) for r in records if r.latency_s > 0)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


_PIECE = re.compile(r"\S+\s*|\s+")


def replay_pieces(text: str, words: int = 6) -> list[str]:
    """An answer not streamed as it was written (a cached one, a proposal) streamed now: a few
    words per SSE chunk, as a model would send them."""
    parts = _PIECE.findall(text)
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)] or [text]
