"""The MoA engine: proposer layers with quorum and deadlines, aggregation, fallbacks, streaming.

It is transport-agnostic: every model call goes through a ``ModelCaller``. Non-streaming and
streaming runs share one pipeline and one ``RunRequest``; ``run`` simply drains it. A run's
stages share one ``RunContext`` (``moa.engine.context``); a proposer layer runs in
``moa.engine.layer``, an answer chain in ``moa.engine.chain``, and span attributes are set in
``moa.engine.spans``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Unpack

from opentelemetry import trace

from moa.cache import CacheTicket, ResponseCache, open_cache
from moa.caller import ModelCaller
from moa.caps import check_messages, check_plan
from moa.config import MoAConfig
from moa.engine import spans
from moa.engine.calls import check_window
from moa.engine.chain import Writer, answer_chain, synthesise
from moa.engine.context import Routed, RunContext, RunOptions, RunRequest
from moa.engine.fusion import Fuser, LocalFuser
from moa.engine.layer import LayerOutcome, Upstream, run_layer
from moa.engine.router import LOCAL_TENANT, BeforeCall, Router, RouterPolicy
from moa.engine.staircase import StaircaseFeed, climb
from moa.errors import FallbackReason, MoAError
from moa.plan import ModelRef, PlanMode
from moa.result import (
    AnswerSource,
    CallRecord,
    MoAResult,
    Progress,
    RouteDecision,
    Stage,
)
from moa.types import CallResult, ChatMessage, GenerationParams, HealthView, TextDelta
from moa_observability.tracing import attached, iterate_in, tracer

__all__ = ["MoAEngine", "Routed", "RunRequest"]


@dataclass
class _Route:
    """One way to the final answer: a chain of models tried in order, and why it is taken."""

    chain: Sequence[ModelRef]
    stage: Stage
    references: list[str]
    reason: str | None = None
    reason_kind: FallbackReason | None = None


class MoAEngine:
    """Runs plans. ``health`` supplies the router's view of provider health (circuit states)."""

    def __init__(
        self,
        config: MoAConfig,
        caller: ModelCaller,
        *,
        router: Router | None = None,
        health: Callable[[], HealthView] | None = None,
        fuser: Fuser | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.caller = caller
        # The response cache (final answers and proposer calls): the config's, unless given.
        self.cache = cache if cache is not None else open_cache(config)
        # Where fusion runs: in-process by default, the aggregator deployment in the Ray app.
        self.fuser = fuser or LocalFuser(caller, config)
        self.router: Router = router or RouterPolicy(config, caller)
        self._health = health or HealthView

    # -- public API -------------------------------------------------------------------------------

    def health(self) -> HealthView:
        """The router's current view of provider health."""
        return self._health()

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preset: str | None = None,
        *,
        tenant: str = LOCAL_TENANT,
        before_classifier: BeforeCall | None = None,
    ) -> Routed:
        """Route ``messages``: ``tenant`` scopes the router's memory of them (its classifier cache);
        ``before_classifier`` is awaited before a paid classifier call and may refuse it."""
        check_messages(self.config.caps, messages)  # before the router reads them
        with tracer().start_as_current_span("moa.route") as span:
            routed = await self.router.route(
                messages, preset, self._health(), tenant=tenant, before_call=before_classifier
            )
            spans.routed(span, routed[1])
            return routed

    async def run(self, messages: Sequence[ChatMessage], **options: Unpack[RunOptions]) -> MoAResult:
        """Answer ``messages`` with a preset (``auto`` routes) or an explicit plan (see ``stream``
        for the options)."""
        result: MoAResult | None = None
        async for ev in self.execute(RunRequest.of(messages, stream=False, **options)):
            if isinstance(ev, MoAResult):
                result = ev
        assert result is not None
        return result

    def stream(
        self, messages: Sequence[ChatMessage], **options: Unpack[RunOptions]
    ) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """Yield ``Progress`` (first ``admitted``, once the plan passed routing, admission and the
        caps), the final answer's ``TextDelta``s as they arrive, then the ``MoAResult``.

        Options (``RunOptions``): ``preset`` (``auto`` routes) or an explicit ``plan``; ``params``;
        ``routed`` passes a decision already taken by ``route``. ``aggregation`` overrides the
        plan's aggregation mode (staircase applies to streamed layered plans; others run final).
        ``admit``, when given, sees the routed plan as it will run (every override applied) before
        any model is called and may refuse it (raise) or replace it with another plan put through
        the shape it is given (a key's access rules and cost cap do both); ``on_call`` is told of
        every call recorded. ``reserve``, when given, is awaited
        once models will be called (the cache had no answer), before any call, and may refuse
        (raise): a key's budget reservation, a state-store write a cached answer does not need.
        ``tenant`` scopes the router's memory of the request (its LLM classifier's cache; by
        default the cache ticket's scope); ``before_classifier`` is awaited before that classifier
        calls its model and may refuse (raise): a key that cannot pay for the call. ``ticket`` is
        what the response cache may do for the request (the API's, per key); without one a run
        reads and writes the local scope. The router's
        calls reach ``on_call`` before ``admit`` sees the plan, so they count even when it refuses.
        The run ends at ``deadline`` (or ``deadline_s`` from now) with ``DeadlineExceeded``.
        """
        return self.execute(RunRequest.of(messages, stream=True, **options))

    async def execute(self, request: RunRequest) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """Run ``request``: what ``run`` and ``stream`` share. Without ``request.stream`` the final
        answer yields no ``TextDelta``s (it is only in the ``MoAResult``)."""
        t0 = time.monotonic()
        span = tracer().start_span("moa.run")
        span_ctx = trace.set_span_in_context(span)
        result: MoAResult | None = None
        ctx: RunContext | None = None
        try:
            routed = request.routed
            if routed is None:
                if request.plan is not None:
                    routed = (
                        request.plan,
                        RouteDecision(preset="custom", forced=True, reason="explicit plan"),
                        [],
                    )
                else:
                    with attached(span_ctx):
                        routed = await self.route(
                            request.messages,
                            request.preset,
                            tenant=self._tenant(request),
                            before_classifier=request.before_classifier,
                        )
            # The router's calls (an LLM classifier's) are paid for whatever happens next: told to
            # ``on_call`` now, so a request that admission refuses is still billed for them.
            routed_plan, decision, pre_calls = routed
            pre_records = [
                CallRecord.from_result(res, stage=Stage.CLASSIFIER, started_s=0.0) for res in pre_calls
            ]
            if request.on_call is not None:
                for rec in pre_records:
                    request.on_call(rec)
            # Every override first: admission projects and caps the plan that will really run.
            routed = (request.shape(routed_plan), decision, pre_calls)
            if request.admit is not None:
                routed = await request.admit(routed, request.shape)
            plan, decision, _ = routed
            check_messages(self.config.caps, request.messages)
            check_plan(self.config.caps, plan, request.params or GenerationParams(), len(pre_calls))
            # The models that would answer (their windows as declared, or as their servers said).
            check_window(
                self.config,
                [*plan.aggregators, *plan.fallbacks],
                request.messages,
                request.params or GenerationParams(),
            )
            spans.run_planned(span, decision, plan)
            ctx = RunContext(
                config=self.config,
                caller=self.caller,
                fuser=self.fuser,
                cache=self.cache,
                messages=list(request.messages),
                plan=plan,
                decision=decision,
                params=request.params or GenerationParams(),
                stream=request.stream,
                t0=t0,
                deadline=request.deadline,
                on_call=request.on_call,
            )
            for res, rec in zip(pre_calls, pre_records, strict=True):
                ctx.record(res, rec, notify=False)
            ctx.ticket = self._ticket(request, decision)
            if ctx.ticket is not None:
                with attached(span_ctx):  # the lookup's span is the run's child
                    hit = await self._cached(ctx)
                if hit is not None:
                    result = hit
                    span.set_attribute("moa.cache", hit.cache.status)
                    if ctx.stream:
                        for piece in _replay_pieces(hit.text):
                            yield TextDelta(text=piece)
                    yield hit
                    return
            if request.reserve is not None:
                await request.reserve()
            async for ev in iterate_in(span_ctx, self._events(ctx)):
                if isinstance(ev, MoAResult):
                    result = ev
                    if ctx.ticket is not None and self.cache is not None:
                        why = await self.cache.store_answer(ctx.ticket, ctx.messages, plan, ctx.params, ev)
                        if why is not None:
                            ctx.ticket.outcome.reason = ctx.ticket.outcome.reason or f"not stored: {why}"
                        ev.cache = ctx.ticket.outcome.model_copy()
                        span.set_attribute("moa.cache", ev.cache.status)
                yield ev
        except MoAError as e:
            # A missed quorum still counts in the metrics.
            e.fallback_reason = ctx.fallback_reason if ctx is not None else None
            spans.failed(span, e.code)
            raise
        finally:
            if result is not None:
                spans.run_answered(span, result)
            span.end()

    @staticmethod
    def _tenant(request: RunRequest) -> str:
        """Whose request this is: the API's (the key's scope), else the response cache's ticket's,
        else (``moa ask``) the local scope."""
        if request.tenant is not None:
            return request.tenant
        return request.ticket.scope if request.ticket is not None else LOCAL_TENANT

    # -- the response cache -----------------------------------------------------------------------

    def _ticket(self, request: RunRequest, decision: RouteDecision) -> CacheTicket | None:
        """This run's cache rights: the request's (the API's, per key), or, outside the API (``moa
        ask``), the local scope's. A preset listed in ``cache.semantic.presets`` turns semantic on."""
        if self.cache is None:
            return None
        ticket = request.ticket or CacheTicket.for_request("local")
        if decision.preset in self.config.cache.semantic.presets:
            ticket.semantic = True
        return ticket

    async def _cached(self, ctx: RunContext) -> MoAResult | None:
        """The answer from the cache, when it may serve one and has it."""
        assert self.cache is not None and ctx.ticket is not None
        ticket = ctx.ticket
        why = self.cache.readable(ticket, ctx.params)
        if why is not None:
            ticket.outcome.status, ticket.outcome.reason = "bypass", why
            return None
        hit = await self.cache.lookup(ticket, ctx.messages, ctx.plan, ctx.params)
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

    # -- the pipeline -----------------------------------------------------------------------------

    async def _events(self, ctx: RunContext) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        plan = ctx.plan
        yield Progress(stage="admitted", layers=ctx.layers, preset=ctx.decision.preset)
        feeds: list[StaircaseFeed] = []
        if ctx.stream and plan.aggregation == "staircase" and plan.mode is not PlanMode.REFINE:
            # Every layer streams into its feed; the final aggregator climbs the last one's.
            chunk = plan.staircase_chunk_chars
            feeds = [StaircaseFeed(len(layer.proposers), layer.needed, chunk) for layer in plan.layers]
        # Progress for the client and, in a staircase, the steps' text: in the order they happen.
        out: asyncio.Queue[Progress | TextDelta] = asyncio.Queue()
        ctx.progress = out.put_nowait
        proposals = asyncio.create_task(self._proposals(ctx, feeds))
        climber = asyncio.create_task(self._climb(ctx, feeds[-1], out)) if feeds else None
        tasks = [t for t in (proposals, climber) if t is not None]
        getter: asyncio.Future[Progress | TextDelta] | None = None
        try:
            while running := {t for t in tasks if not t.done()}:
                getter = getter or asyncio.ensure_future(out.get())
                done, _ = await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    got, getter = getter.result(), None
                    yield got
                if climber is not None and climber.done():
                    climber.result()  # a step that failed after its text went out ends the run
            if getter is not None and getter.done():
                got, getter = getter.result(), None
                yield got
            while not out.empty():
                yield out.get_nowait()
            references, missed = proposals.result()
            answer = climber.result() if climber is not None else ""
        finally:
            ctx.progress = None
            if getter is not None and not getter.done():  # the run ended while waiting
                getter.cancel()
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield Progress(stage="aggregating", layers=ctx.layers)
        if answer:
            # Staircase steps already sent text: only the aggregators can continue it.
            if missed is not None:
                ctx.note(f"{missed[0]} after the staircase had started answering")
                ctx.raise_failed()
            routes = [_Route(plan.aggregators, Stage.AGGREGATOR, references)]
            async for ev in self._finish(ctx, routes, answer):
                yield ev
            return
        policy = plan.on_aggregators_failed
        salvage: FallbackReason | None = None  # why a proposal may answer, once every route failed
        if missed is not None:
            # A layer missed its quorum: the single-model fallback chain answers instead.
            ctx.deadline.check()
            why, kind = missed
            ctx.fallback_reason = kind
            ctx.note(f"{why}; falling back to a single model")
            routes = [_Route(plan.fallbacks, Stage.FALLBACK, [], why, kind)]
            if kind is FallbackReason.SYNTHESIS_FAILED and policy != "fail":
                # The round's proposers answered; only its synthesis failed.
                salvage = kind
                if policy == "proposal":
                    routes = []
        else:
            routes = [_Route(plan.aggregators, Stage.AGGREGATOR, references)]
            if plan.fallbacks and not plan.is_single and policy == "fallbacks":
                why = "every aggregator failed"
                routes.append(
                    _Route(plan.fallbacks, Stage.FALLBACK, [], why, FallbackReason.AGGREGATORS_FAILED)
                )
            if policy != "fail" and not plan.is_single:
                salvage = FallbackReason.AGGREGATORS_FAILED
        async for ev in self._finish(ctx, routes, salvage=salvage):
            yield ev

    async def _climb(
        self, ctx: RunContext, feed: StaircaseFeed, out: asyncio.Queue[Progress | TextDelta]
    ) -> str:
        """The final aggregator's intermediate staircase steps over the last layer's ``feed``; their
        text goes to the client (through ``out``). Returns the answer they wrote."""
        writer = Writer(chain=ctx.plan.aggregators, stage=Stage.AGGREGATOR)
        answer = ""
        steps = climb(ctx, writer, feed)
        async with aclosing(steps):
            async for ev in steps:
                if isinstance(ev, TextDelta):
                    answer += ev.text
                    out.put_nowait(ev)
        return answer

    async def _proposals(
        self, ctx: RunContext, feeds: Sequence[StaircaseFeed] = ()
    ) -> tuple[list[str], tuple[str, FallbackReason] | None]:
        """Run the proposer layers; return the last layer's answers, or why a fallback must answer.
        With staircase ``feeds`` (one per layer), the layers stream through them at once."""
        plan = ctx.plan
        if feeds:
            return await self._streamed_layers(ctx, feeds)
        references: list[str] = []
        if plan.mode is not PlanMode.REFINE:
            for index, layer in enumerate(plan.layers, start=1):
                outcome = await run_layer(ctx, index, layer, references)
                if not outcome.met:
                    return [], (f"layer {index} missed its quorum", FallbackReason.QUORUM_MISSED)
                references, ctx.proposals = outcome.answers, outcome.answered
            return references, None
        layer = plan.layers[0]
        for rnd in range(1, plan.rounds + 1):
            prior = references if rnd > 1 else []
            outcome = await run_layer(ctx, rnd, layer, prior, refine=rnd > 1, round_=rnd)
            if not outcome.met:
                return [], (f"round {rnd} missed its quorum", FallbackReason.QUORUM_MISSED)
            references, ctx.proposals = outcome.answers, outcome.answered
            if rnd < plan.rounds:
                synthesis = await synthesise(ctx, references, round_=rnd)
                if synthesis is None:
                    return [], (f"round {rnd} synthesis failed", FallbackReason.SYNTHESIS_FAILED)
                references = [synthesis]
        return references, None

    async def _streamed_layers(
        self, ctx: RunContext, feeds: Sequence[StaircaseFeed]
    ) -> tuple[list[str], tuple[str, FallbackReason] | None]:
        """Staircase layers: all start at once, each layer after the first stepping over the one
        before it (``run_layer`` with an ``Upstream``). The first layer to miss its quorum (a later
        one may know first: its own proposers failed) sends the run to its fallback chain, and
        every layer still running is cancelled."""
        layers: list[asyncio.Task[LayerOutcome]] = []
        try:
            for index, layer in enumerate(ctx.plan.layers, start=1):
                upstream = Upstream(feeds[index - 2], layers[-1]) if layers else None
                run = run_layer(ctx, index, layer, [], feed=feeds[index - 1], upstream=upstream)
                layers.append(asyncio.create_task(run))
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

    async def _finish(
        self,
        ctx: RunContext,
        routes: Sequence[_Route],
        prefix: str = "",
        *,
        salvage: FallbackReason | None = None,
    ) -> AsyncIterator[TextDelta | MoAResult]:
        """The final answer: the first route whose chain succeeds. When every route failed and
        ``salvage`` says why a proposal may answer (every aggregator failed after the proposers
        answered), the best proposal the run has answers; otherwise every failure is listed.
        ``prefix`` is the answer's text already sent (staircase steps), which the chain continues.

        A route that fails after its text went out ends the run inside its chain (text cannot be
        retracted), so a proposal only ever answers a run whose client has seen nothing yet."""
        for i, route in enumerate(routes):
            later = sum(len(r.chain) for r in routes[i + 1 :])
            chain = answer_chain(
                ctx, route.chain, route.stage, route.references, stream=ctx.stream, later=later, prefix=prefix
            )
            source: AnswerSource = "fallback" if route.stage is Stage.FALLBACK else "aggregator"
            async with aclosing(chain):
                async for ev in chain:
                    if isinstance(ev, CallResult):
                        yield _result(ctx, ev, route.reason, route.reason_kind, source)
                        return
                    yield ev
        best = best_proposal(ctx.proposals) if salvage is not None else None
        if best is None:
            ctx.raise_failed()
        assert best is not None and salvage is not None
        # Paid for, and in hand: answered as it was written rather than thrown away with an error.
        name = f"{best.provider}/{best.requested_model}"
        why = f"every aggregator failed; answered with the best proposal ({name})"
        ctx.fallback_reason = salvage
        ctx.note(f"{why}: the first in the layer's order that finished on its own, else the first")
        if ctx.stream:
            for piece in _replay_pieces(best.text):
                yield TextDelta(text=piece)
        yield _result(ctx, best, why, salvage, "proposal")


def best_proposal(answered: Sequence[CallResult]) -> CallResult | None:
    """The proposal a run answers with when its aggregators all failed: the first, in the layer's
    proposer order, whose answer finished on its own (``stop``: not cut at its token limit), else
    the first. The order is the plan's, which lists the proposers as the operator ranks them; no
    reading of the texts is attempted, so the rule is the same for every model and language."""
    usable = [r for r in answered if r.ok and r.text]
    complete = [r for r in usable if r.finish_reason == "stop"]
    ranked = complete or usable
    return ranked[0] if ranked else None


def _result(
    ctx: RunContext,
    final: CallResult,
    fallback: str | None,
    fallback_reason: FallbackReason | None,
    source: AnswerSource = "aggregator",
) -> MoAResult:
    usage = sum((r.usage for r in ctx.records), start=type(final.usage)())
    return MoAResult(
        text=final.text,
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
    sum counted those seconds twice (a request of 15.3 s reported a critical path of 22.8 s). So
    it never exceeds the wall time; what the run spent between calls is its own overhead."""
    spans = sorted((r.started_s, r.started_s + r.latency_s) for r in records if r.latency_s > 0)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


_PIECE = re.compile(r"\S+\s*|\s+")


def _replay_pieces(text: str, words: int = 6) -> list[str]:
    """A cached answer streamed again: a few words per SSE chunk, as a model would send them."""
    parts = _PIECE.findall(text)
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)] or [text]
