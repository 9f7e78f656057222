"""The response cache's part in a run: which rights the run has (its ticket), the answer the cache
may serve instead of running, and storing the answer the run gave."""

from __future__ import annotations

from opentelemetry.trace import Span

from moa.cache import CacheTicket
from moa.engine.answer import replay_pieces
from moa.engine.context import RunContext
from moa.result import MoAResult, RouteDecision
from moa.types import TextDelta

# Why a request for several answers (``n`` > 1) neither reads nor writes the answers' level: an
# entry is one answer. Its proposer calls still go through the proposal level, as any run's.
SEVERAL = "n > 1 asks for several answers, and a cached answer is one"


def ticket(ctx: RunContext, decision: RouteDecision, given: CacheTicket | None) -> CacheTicket | None:
    """This run's cache rights: ``given`` (the request's: the API's, per key), or, outside the API
    (``moa ask``), the local scope's. A preset listed in ``cache.semantic.presets`` turns semantic
    on."""
    if ctx.cache is None:
        return None
    found = given or CacheTicket.for_request("local")
    if decision.preset in ctx.config.cache.semantic.presets:
        found.semantic = True
    return found


async def lookup(ctx: RunContext) -> MoAResult | None:
    """The answer from the cache, when it may serve one and has it."""
    assert ctx.cache is not None and ctx.ticket is not None
    cache, ticket = ctx.cache, ctx.ticket
    why = SEVERAL if ctx.choices > 1 else cache.readable(ticket, ctx.params)
    if why is not None:
        ticket.outcome.status, ticket.outcome.reason = "bypass", why
        return None
    hit = await cache.lookup(ticket, ctx.messages, ctx.plan, ctx.params)
    if hit is None:
        ticket.outcome.status = "miss"
        return None
    ticket.outcome = hit.result.cache
    result = hit.result.model_copy(
        update={
            "preset": ctx.decision.preset,
            "decision": ctx.decision,
            "calls": [*ctx.records, *hit.result.calls],
            "wall_time_s": ctx.offset(),
        }
    )
    result.usage = sum((r.usage for r in ctx.records), start=result.usage)
    result.cost_usd = sum(r.cost_usd for r in ctx.records)
    for rec in hit.result.calls:
        if ctx.on_call is not None:
            ctx.on_call(rec)
    return result


def replayed(ctx: RunContext, hit: MoAResult) -> list[TextDelta | MoAResult]:
    """What a run answered from the cache yields: its text again when streamed, then the result."""
    pieces = [TextDelta(text=piece) for piece in replay_pieces(hit.text)] if ctx.stream or ctx.replay else []
    return [*pieces, hit]


async def store(ctx: RunContext, result: MoAResult, span: Span) -> None:
    """Keep the run's answer, when the run may (its ticket); ``result`` and ``span`` say what the
    cache did for the run."""
    if ctx.ticket is None or ctx.cache is None:
        return
    if ctx.choices > 1:
        result.cache = ctx.ticket.outcome.model_copy()
        span.set_attribute("moa.cache", result.cache.status)
        return
    why = await ctx.cache.store_answer(ctx.ticket, ctx.messages, ctx.plan, ctx.params, result)
    if why is not None:
        ctx.ticket.outcome.reason = ctx.ticket.outcome.reason or f"not stored: {why}"
    result.cache = ctx.ticket.outcome.model_copy()
    span.set_attribute("moa.cache", result.cache.status)
