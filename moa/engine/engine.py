"""The MoA engine: proposer layers with quorum and deadlines, aggregation, fallbacks, streaming.

It is transport-agnostic: every model call goes through a ``ModelCaller``. Non-streaming and
streaming runs share one pipeline (``_events``); ``run`` simply drains it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from moa.cache import CacheTicket, ResponseCache, current_ticket, open_cache
from moa.config import MoAConfig
from moa.engine.caller import ModelCaller
from moa.engine.calls import fit_references, merge_params, provider_kind, safe_call, safe_stream
from moa.engine.caps import check_messages, check_plan
from moa.engine.errors import AllProvidersFailed, DeadlineExceeded, Failure, MoAError
from moa.engine.fusion import FuseJob, Fuser, LocalFuser
from moa.engine.plan import AggregationMode, AggregatorSpec, LayerSpec, ModelRef, Plan, PlanMode
from moa.engine.prompts import with_references
from moa.engine.result import CallRecord, FallbackReason, MoAResult, Progress, RouteDecision, Stage
from moa.engine.router import HealthView, Router, RouterPolicy
from moa.engine.staircase import StaircaseFeed
from moa.types import (
    CallError,
    CallRequest,
    CallResult,
    ChatMessage,
    ErrorKind,
    GenerationParams,
    TextDelta,
)
from observability.tracing import iterate_in, tracer


@dataclass
class _Run:
    """Mutable state of one run: the clock, the calls so far, notes."""

    t0: float
    deadline: float | None
    records: list[CallRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    critical_path_s: float = 0.0
    simulated_critical_s: float | None = None
    # Told of every call as it is recorded (the API meters a request's spend with it).
    on_call: Callable[[CallRecord], None] | None = None
    # Why the run turned to its fallback chain, if it did (kept for a run that then failed).
    fallback_reason: FallbackReason | None = None
    # Told where the proposer layers stand, for a streaming client waiting for its first token.
    progress: Callable[[Progress], None] | None = None
    # What the response cache may do for this run (None: no cache).
    ticket: CacheTicket | None = None

    def offset(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def note(self, *notes: str) -> None:
        self.notes.extend(n for n in notes if n not in self.notes)

    def add_simulated(self, seconds: float | None) -> None:
        if seconds is not None:
            self.simulated_critical_s = (self.simulated_critical_s or 0.0) + seconds

    def record(self, res: CallResult, rec: CallRecord) -> None:
        self.records.append(rec)
        if self.on_call is not None:
            self.on_call(rec)
        if res.error is not None:
            stage = rec.stage.value if rec.layer is None else f"{rec.stage.value} layer {rec.layer}"
            self.failures.append(
                Failure(
                    provider=res.provider,
                    model=res.requested_model,
                    kind=res.error.kind,
                    stage=stage,
                    retry_after_s=res.error.retry_after_s,
                )
            )


# A routing decision: the plan, why, and any calls the router made (an LLM classifier).
Routed = tuple[Plan, RouteDecision, list[CallResult]]


@dataclass
class _Route:
    """One way to the final answer: a chain of models tried in order, and why it is taken."""

    chain: Sequence[ModelRef]
    stage: Stage
    references: list[str]
    reason: str | None = None
    reason_kind: FallbackReason | None = None


@dataclass
class _LayerOutcome:
    answers: list[str]
    met: bool
    stragglers: int = 0


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

    async def route(self, messages: Sequence[ChatMessage], preset: str | None = None) -> Routed:
        check_messages(self.config.caps, messages)  # before the router reads them
        with tracer().start_as_current_span("moa.route") as span:
            routed = await self.router.route(messages, preset, self._health())
            decision = routed[1]
            span.set_attributes(
                {
                    "moa.preset": decision.preset,
                    "moa.router.forced": decision.forced,
                    "moa.router.reason": decision.reason,
                    "moa.router.complexity": decision.complexity.value if decision.complexity else "",
                    "moa.router.task": decision.task.value if decision.task else "",
                    "moa.router.substitutions": len(decision.substitutions),
                }
            )
            return routed

    async def run(
        self,
        messages: Sequence[ChatMessage],
        *,
        preset: str | None = None,
        plan: Plan | None = None,
        params: GenerationParams | None = None,
        deadline_s: float | None = None,
        routed: Routed | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        admit: Callable[[Routed], Awaitable[Routed]] | None = None,
        aggregation: AggregationMode | None = None,
        reserve: Callable[[], Awaitable[None]] | None = None,
    ) -> MoAResult:
        """Answer ``messages`` with a preset (``auto`` routes) or an explicit plan."""
        result: MoAResult | None = None
        async for ev in self.stream(
            messages,
            preset=preset,
            plan=plan,
            params=params,
            deadline_s=deadline_s,
            routed=routed,
            on_call=on_call,
            admit=admit,
            aggregation=aggregation,
            reserve=reserve,
            _stream_final=False,
        ):
            if isinstance(ev, MoAResult):
                result = ev
        assert result is not None
        return result

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        preset: str | None = None,
        plan: Plan | None = None,
        params: GenerationParams | None = None,
        deadline_s: float | None = None,
        routed: Routed | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        admit: Callable[[Routed], Awaitable[Routed]] | None = None,
        aggregation: AggregationMode | None = None,
        reserve: Callable[[], Awaitable[None]] | None = None,
        _stream_final: bool = True,
    ) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """Yield ``Progress`` (first ``admitted``, once the plan passed routing, admission and the
        caps), the final answer's ``TextDelta``s as they arrive, then the ``MoAResult``.

        ``routed`` passes a decision already taken by ``route``. ``admit``, when given, sees the
        routed plan before any model is called and may refuse it (raise) or replace it (a key's
        access rules and cost cap do both); ``on_call`` is told of every call recorded.
        ``aggregation`` overrides the plan's aggregation mode. ``reserve``, when given, is awaited
        once models will be called (the cache had no answer), before any call, and may refuse
        (raise): a key's budget reservation, a state-store write a cached answer does not need.
        """
        t0 = time.monotonic()
        run = _Run(t0=t0, deadline=None if deadline_s is None else t0 + deadline_s, on_call=on_call)
        span = tracer().start_span("moa.run")
        ctx = trace.set_span_in_context(span)
        result: MoAResult | None = None
        try:
            if routed is None:
                if plan is not None:
                    routed = (plan, RouteDecision(preset="custom", forced=True, reason="explicit plan"), [])
                else:
                    token = otel_context.attach(ctx)
                    try:
                        routed = await self.route(messages, preset)
                    finally:
                        otel_context.detach(token)
            if admit is not None:
                routed = await admit(routed)
            plan, decision, pre_calls = routed
            if aggregation is not None and aggregation != plan.aggregation:
                plan = plan.model_copy(update={"aggregation": aggregation})
            check_messages(self.config.caps, messages)
            check_plan(self.config.caps, plan, params or GenerationParams(), len(pre_calls))
            span.set_attributes(
                {
                    "moa.preset": decision.preset,
                    "moa.router.reason": decision.reason,
                    "moa.aggregation": plan.aggregation,
                }
            )
            for res in pre_calls:
                run.record(res, CallRecord.from_result(res, stage=Stage.CLASSIFIER, started_s=0.0))
            gen = params or GenerationParams()
            run.ticket = self._ticket(decision)
            if run.ticket is not None:
                hit = await self._cached(run, messages, plan, decision, gen)
                if hit is not None:
                    result = hit
                    span.set_attribute("moa.cache", hit.cache.status)
                    if _stream_final:
                        for piece in _replay_pieces(hit.text):
                            yield TextDelta(text=piece)
                    yield hit
                    return
            if reserve is not None:
                await reserve()
            events = self._events(list(messages), plan, decision, gen, run, _stream_final)
            async for ev in iterate_in(ctx, events):
                if isinstance(ev, MoAResult):
                    result = ev
                    if run.ticket is not None and self.cache is not None:
                        why = await self.cache.store_answer(run.ticket, messages, plan, gen, ev)
                        if why is not None:
                            run.ticket.outcome.reason = run.ticket.outcome.reason or f"not stored: {why}"
                        ev.cache = run.ticket.outcome.model_copy()
                        span.set_attribute("moa.cache", ev.cache.status)
                yield ev
        except MoAError as e:
            e.fallback_reason = run.fallback_reason  # a missed quorum still counts in the metrics
            span.set_attribute("error.type", e.code)
            span.set_status(Status(StatusCode.ERROR, e.code))
            raise
        finally:
            if result is not None:
                span.set_attributes(
                    {
                        "moa.answered_by": f"{result.provider}/{result.model}",
                        "moa.calls": len(result.calls),
                        "moa.cost_usd": result.cost_usd,
                        "moa.stragglers_cancelled": result.stragglers_cancelled,
                        "moa.fallback": result.fallback or "",
                        "gen_ai.usage.input_tokens": result.usage.input_tokens,
                        "gen_ai.usage.output_tokens": result.usage.output_tokens,
                    }
                )
            span.end()

    # -- the response cache -----------------------------------------------------------------------

    def _ticket(self, decision: RouteDecision) -> CacheTicket | None:
        """This run's cache rights: the API's (set per request), or, outside the API (``moa
        ask``), the local scope's. A preset listed in ``cache.semantic.presets`` turns semantic on."""
        if self.cache is None:
            return None
        ticket = current_ticket() or CacheTicket.for_request("local")
        if decision.preset in self.config.cache.semantic.presets:
            ticket.semantic = True
        return ticket

    async def _cached(
        self,
        run: _Run,
        messages: Sequence[ChatMessage],
        plan: Plan,
        decision: RouteDecision,
        params: GenerationParams,
    ) -> MoAResult | None:
        """The answer from the cache, when it may serve one and has it."""
        assert self.cache is not None and run.ticket is not None
        ticket = run.ticket
        why = self.cache.readable(ticket, params)
        if why is not None:
            ticket.outcome.status, ticket.outcome.reason = "bypass", why
            return None
        hit = await self.cache.lookup(ticket, messages, plan, params)
        if hit is None:
            ticket.outcome.status = "miss"
            return None
        ticket.outcome = hit.result.cache
        result = hit.result.model_copy(
            update={
                "preset": decision.preset,
                "decision": decision,
                "calls": [*run.records, *hit.result.calls],
                "wall_time_s": run.offset(),
            }
        )
        result.usage = sum((r.usage for r in run.records), start=result.usage)
        result.cost_usd = sum(r.cost_usd for r in run.records)
        for rec in hit.result.calls:
            if run.on_call is not None:
                run.on_call(rec)
        return result

    # -- the pipeline -----------------------------------------------------------------------------

    async def _events(
        self,
        messages: list[ChatMessage],
        plan: Plan,
        decision: RouteDecision,
        params: GenerationParams,
        run: _Run,
        stream_final: bool,
    ) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        layers = plan.rounds if plan.mode is PlanMode.REFINE else len(plan.layers)
        yield Progress(stage="admitted", layers=layers)
        feed: StaircaseFeed | None = None
        if stream_final and plan.aggregation == "staircase" and plan.mode is not PlanMode.REFINE and layers:
            feed = StaircaseFeed(len(plan.layers[-1].proposers), plan.layers[-1].needed)
        proposals = asyncio.create_task(self._proposals(messages, plan, params, run, feed))
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        run.progress = queue.put_nowait
        getter: asyncio.Future[Progress] | None = None
        grown: asyncio.Future[bool] | None = None
        answer, step = "", 0  # staircase: the answer written so far, the last step taken
        try:
            while not proposals.done():
                getter = getter or asyncio.ensure_future(queue.get())
                waits: set[asyncio.Future[Any]] = {proposals, getter}
                if feed is not None and step < plan.staircase_steps:
                    grown = grown or asyncio.ensure_future(feed.changed.wait())
                    waits.add(grown)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    got, getter = getter.result(), None
                    yield got
                if grown is not None and grown in done:
                    grown = None
                    assert feed is not None
                    feed.changed.clear()
                    if feed.ready((step + 1) * plan.staircase_chunk_chars):
                        step += 1
                        refs = feed.partial(step * plan.staircase_chunk_chars)
                        async for delta in self._staircase_step(
                            messages, refs, plan, params, run, answer, step
                        ):
                            answer += delta.text
                            yield delta
            if getter is not None and getter.done():  # read while a staircase step ran
                got, getter = getter.result(), None
                yield got
            while not queue.empty():
                yield queue.get_nowait()
            references, missed = proposals.result()
        finally:
            run.progress = None
            for waiter in (getter, grown):
                if waiter is not None and not waiter.done():  # the run ended while waiting
                    waiter.cancel()
            if not proposals.done():
                proposals.cancel()
                await asyncio.gather(proposals, return_exceptions=True)
        yield Progress(stage="aggregating", layers=layers)
        if answer:
            # Staircase steps already sent text: only the aggregators can continue it.
            if missed is not None:
                run.note(f"{missed[0]} after the staircase had started answering")
                self._raise_failed(run)
            routes = [_Route(plan.aggregators, Stage.AGGREGATOR, references)]
            async for ev in self._finish(routes, messages, plan, decision, params, run, stream_final, answer):
                yield ev
            return
        if missed is not None:
            # A layer missed its quorum: the single-model fallback chain answers instead.
            self._check_deadline(run)
            why, kind = missed
            run.fallback_reason = kind
            run.note(f"{why}; falling back to a single model")
            routes = [_Route(plan.fallbacks, Stage.FALLBACK, [], why, kind)]
        else:
            routes = [_Route(plan.aggregators, Stage.AGGREGATOR, references)]
            if plan.fallbacks and not plan.is_single:
                why = "every aggregator failed"
                routes.append(_Route(plan.fallbacks, Stage.FALLBACK, [], why, "aggregators_failed"))
        async for ev in self._finish(routes, messages, plan, decision, params, run, stream_final):
            yield ev

    async def _staircase_step(
        self,
        messages: list[ChatMessage],
        references: list[str],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        answer: str,
        step: int,
    ) -> AsyncIterator[TextDelta]:
        """One intermediate staircase step: the answer so far, continued for a few tokens from the
        proposers' answers up to the step's boundary."""
        limit = plan.staircase_step_tokens
        step_params = params.model_copy(update={"max_tokens": min(limit, params.max_tokens or limit)})
        chain = self._answer_chain(
            plan.aggregators,
            Stage.AGGREGATOR,
            messages,
            references,
            plan,
            step_params,
            run,
            True,
            prefix=answer,
            step=step,
        )
        async with aclosing(chain):
            async for ev in chain:
                if isinstance(ev, TextDelta):
                    yield ev

    async def _proposals(
        self,
        messages: list[ChatMessage],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        feed: StaircaseFeed | None = None,
    ) -> tuple[list[str], tuple[str, FallbackReason] | None]:
        """Run the proposer layers; return the last layer's answers, or why a fallback must answer.
        With a staircase ``feed``, the last layer's proposers stream their answers into it."""
        references: list[str] = []
        if plan.mode is not PlanMode.REFINE:
            for index, layer in enumerate(plan.layers, start=1):
                last = feed if index == len(plan.layers) else None
                outcome = await self._layer(index, layer, messages, references, plan, params, run, feed=last)
                if not outcome.met:
                    return [], (f"layer {index} missed its quorum", "quorum_missed")
                references = outcome.answers
            return references, None
        layer = plan.layers[0]
        for rnd in range(1, plan.rounds + 1):
            prior = references if rnd > 1 else []
            outcome = await self._layer(
                rnd, layer, messages, prior, plan, params, run, refine=rnd > 1, round_=rnd
            )
            if not outcome.met:
                return [], (f"round {rnd} missed its quorum", "quorum_missed")
            references = outcome.answers
            if rnd < plan.rounds:
                synthesis = await self._synthesise(messages, references, plan, params, run, round_=rnd)
                if synthesis is None:
                    return [], (f"round {rnd} synthesis failed", "synthesis_failed")
                references = [synthesis]
        return references, None

    async def _finish(
        self,
        routes: Sequence[_Route],
        messages: list[ChatMessage],
        plan: Plan,
        decision: RouteDecision,
        params: GenerationParams,
        run: _Run,
        stream_final: bool,
        prefix: str = "",
    ) -> AsyncIterator[TextDelta | MoAResult]:
        """The final answer: the first route whose chain succeeds; every failure listed otherwise.
        ``prefix`` is the answer's text already sent (staircase steps), which the chain continues."""
        for i, route in enumerate(routes):
            later = sum(len(r.chain) for r in routes[i + 1 :])
            chain = self._answer_chain(
                route.chain,
                route.stage,
                messages,
                route.references,
                plan,
                params,
                run,
                stream_final,
                later=later,
                prefix=prefix,
            )
            async with aclosing(chain):
                async for ev in chain:
                    if isinstance(ev, CallResult):
                        yield self._result(ev, plan, decision, run, route.reason, route.reason_kind)
                        return
                    yield ev
        self._raise_failed(run)

    async def _layer(
        self,
        index: int,
        layer: LayerSpec,
        messages: list[ChatMessage],
        references: list[str],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        *,
        refine: bool = False,
        round_: int | None = None,
        feed: StaircaseFeed | None = None,
    ) -> _LayerOutcome:
        """Run one layer's proposers concurrently; stop at quorum plus grace, or at the deadline."""
        attrs = {
            "moa.layer.index": index,
            "moa.layer.proposers": len(layer.proposers),
            "moa.layer.quorum": layer.needed,
        }
        if round_ is not None:
            attrs["moa.round"] = round_
        with tracer().start_as_current_span("moa.layer", attributes=attrs) as span:
            outcome = await self._layer_calls(
                index, layer, messages, references, plan, params, run, refine, round_, feed
            )
            span.set_attributes(
                {
                    "moa.layer.succeeded": len(outcome.answers),
                    "moa.layer.quorum_met": outcome.met,
                    "moa.layer.stragglers_cancelled": outcome.stragglers,
                }
            )
            return outcome

    async def _layer_calls(
        self,
        index: int,
        layer: LayerSpec,
        messages: list[ChatMessage],
        references: list[str],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        refine: bool,
        round_: int | None,
        feed: StaircaseFeed | None = None,
    ) -> _LayerOutcome:
        self._check_deadline(run)
        loop = asyncio.get_running_loop()
        start = loop.time()
        started_s = run.offset()
        stage_deadline = start + plan.layer_deadline_s
        remaining = run.remaining()
        if remaining is not None:
            stage_deadline = min(stage_deadline, start + remaining)
        timeout = max(min(plan.call_timeout_s, stage_deadline - start), 0.001)

        tasks: dict[asyncio.Task[CallResult], int] = {}
        for i, spec in enumerate(layer.proposers):
            refs, notes = fit_references(
                self.config, references, spec, messages, params, plan.reference_budget_tokens
            )
            run.note(*(f"layer {index} {note}" for note in notes))
            msgs = with_references(messages, refs, self.config.templates, refine=refine, role=spec.role)
            req = CallRequest(
                provider=spec.provider,
                model=spec.model,
                messages=tuple(msgs),
                params=merge_params(params, spec),
                timeout_s=timeout,
                role=spec.role,
            )
            if feed is not None:  # staircase: the answer streams into the feed as it is written
                call = feed.consume(i, safe_stream(self.caller, self.config, req))
            elif self.cache is not None and run.ticket is not None and self.config.cache.proposals:
                call = self.cache.call(self.caller, self.config, req, run.ticket)
            else:
                call = safe_call(self.caller, self.config, req)
            tasks[asyncio.create_task(call)] = i

        results: dict[int, CallResult] = {}
        pending = set(tasks)
        quorum_at: float | None = None
        needed = layer.needed
        # Early aggregation: no grace once the quorum is met, the next stage starts at once.
        early = plan.aggregation == "early"
        grace_s = 0.0 if early else plan.grace_s
        layers = plan.rounds if plan.mode is PlanMode.REFINE else len(plan.layers)

        def progress(done: int) -> None:
            if run.progress is not None:
                run.progress(
                    Progress(
                        stage="proposers",
                        layer=index,
                        layers=layers,
                        proposers_done=done,
                        proposers=len(layer.proposers),
                        quorum=needed,
                    )
                )

        progress(0)
        # Why waiting stopped with calls still running; they are cancelled as stragglers.
        stop_reason = "layer deadline passed"
        try:
            while pending:
                wait_until = stage_deadline if quorum_at is None else min(stage_deadline, quorum_at + grace_s)
                now = loop.time()
                if wait_until <= now:
                    # The grace period ended first; a layer (or request) deadline that came
                    # before it is still a deadline.
                    if quorum_at is not None and quorum_at + grace_s <= stage_deadline:
                        stop_reason = "quorum met; " + ("early aggregation" if early else "grace period over")
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=wait_until - now, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    results[tasks[task]] = task.result()
                succeeded = sum(r.ok for r in results.values())
                progress(succeeded)
                if succeeded >= needed and quorum_at is None:
                    quorum_at = loop.time()
                failed = len(results) - succeeded
                if len(layer.proposers) - failed < needed:
                    stop_reason = "the quorum can no longer be reached"
                    break  # do not wait for the rest
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        end = loop.time()
        stragglers = {tasks[t] for t in pending}
        for task in pending:
            i = tasks[task]
            spec = layer.proposers[i]
            kind = ErrorKind.TIMEOUT if stop_reason == "layer deadline passed" else ErrorKind.CANCELLED
            results[i] = CallResult(
                provider=spec.provider,
                provider_kind=provider_kind(self.config, spec.provider),
                requested_model=spec.model,
                latency_s=end - start,
                error=CallError(kind=kind, message=f"cancelled as a straggler: {stop_reason}"),
            )
        answers: list[str] = []
        completed_latency = 0.0
        simulated: list[float] = []
        for i, spec in enumerate(layer.proposers):
            res = results[i]
            straggler = i in stragglers
            rec = CallRecord.from_result(
                res, stage=Stage.PROPOSER, started_s=started_s, layer=index, round=round_, role=spec.role
            )
            rec.cancelled_straggler = straggler
            run.record(res, rec)
            if not straggler:
                completed_latency = max(completed_latency, res.latency_s)
                if res.simulated_service_s is not None:
                    simulated.append(res.simulated_service_s)
            if res.ok:
                answers.append(res.text)
        # A layer cut short waited for its whole duration; otherwise for its slowest call.
        run.critical_path_s += (end - start) if pending else completed_latency
        run.add_simulated(max(simulated) if simulated else None)
        met = len(answers) >= needed
        if not met and run.remaining() is not None and (run.remaining() or 0) <= 0:
            raise DeadlineExceeded(f"the request deadline passed in layer {index}")
        return _LayerOutcome(answers=answers, met=met, stragglers=len(stragglers))

    async def _synthesise(
        self,
        messages: list[ChatMessage],
        references: list[str],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        *,
        round_: int,
    ) -> str | None:
        """An intermediate synthesis (between refine rounds), with the aggregator fallback chain."""
        final: CallResult | None = None
        async for ev in self._answer_chain(
            plan.aggregators, Stage.AGGREGATOR, messages, references, plan, params, run, False, round_=round_
        ):
            if isinstance(ev, CallResult):
                final = ev
        return final.text if final is not None else None

    async def _answer_chain(
        self,
        chain: Sequence[ModelRef],
        stage: Stage,
        messages: list[ChatMessage],
        references: list[str],
        plan: Plan,
        params: GenerationParams,
        run: _Run,
        stream: bool,
        *,
        round_: int | None = None,
        later: int = 0,
        prefix: str = "",
        step: int | None = None,
    ) -> AsyncGenerator[TextDelta | CallResult, None]:
        """Fuse (or, without references, simply answer) through ``chain``; record every attempt.

        Yields the answer's deltas and then the successful result; yields no result when the whole
        chain fails. A stream that breaks after text was sent is continued by the next model of the
        chain (see ``fuse``); text cannot be retracted, so a chain that fails after text went out
        ends the run rather than turning to the fallback chain.
        """
        self._check_deadline(run)
        job = FuseJob(
            chain=tuple(_as_aggregator(ref) for ref in chain),
            messages=tuple(messages),
            references=tuple(references),
            params=params,
            call_timeout_s=plan.call_timeout_s,
            deadline_s=run.remaining(),
            later=later,
            reference_budget_tokens=plan.reference_budget_tokens,
            stream=stream,
            prefix=prefix,
        )
        job_start = run.offset()
        emitted = False
        emitted_before = False  # whether text went out before the attempt being recorded
        span = tracer().start_span(
            "moa.fuse",
            attributes={
                "moa.stage": stage.value,
                "moa.fuse.references": len(references),
                "moa.round": round_ or 0,
                "moa.staircase_step": step or 0,
            },
        )
        events = iterate_in(trace.set_span_in_context(span), self.fuser.fuse(job))
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    emitted = True
                    yield ev
                    continue
                res = ev.result
                run.note(*(f"{stage.value} {note}" for note in ev.notes))
                started = job_start + ev.started_s
                rec = CallRecord.from_result(res, stage=stage, started_s=started, round=round_)
                rec.continued_after_chars = ev.continued_chars
                rec.staircase_step = step
                # An attempt after one that sent text took over its broken answer.
                rec.took_over = emitted_before
                emitted_before = emitted
                run.record(res, rec)
                run.critical_path_s += res.latency_s
                run.add_simulated(res.simulated_service_s)
                name = f"{res.provider}/{res.requested_model}"
                if rec.took_over and ev.continued_chars is not None:
                    run.note(f"{name} continued the answer after its first {ev.continued_chars} characters")
                    span.add_event(
                        "moa.fuse.continue",
                        {
                            "moa.model": name,
                            "moa.continued_after_chars": ev.continued_chars,
                            "moa.ok": res.ok,
                        },
                    )
                    span.set_attributes(
                        {
                            "moa.fuse.continued": True,
                            "moa.fuse.continued_by": name,
                            "moa.fuse.continued_after_chars": ev.continued_chars,
                        }
                    )
                if res.ok:
                    span.set_attribute("moa.answered_by", name)
                    yield res
                    return
                if emitted:
                    run.note(f"{name} failed mid-stream, after its text had gone out")
                    span.add_event("moa.fuse.stream_broken", {"moa.model": name})
            span.set_status(Status(StatusCode.ERROR, "every model of the chain failed"))
            if emitted:
                self._raise_failed(run)  # text is out: no fallback can take it back
            self._check_deadline(run)
        finally:
            await events.aclose()
            span.end()

    def _check_deadline(self, run: _Run) -> None:
        remaining = run.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request deadline passed before an answer was ready")

    def _raise_failed(self, run: _Run) -> None:
        self._check_deadline(run)
        raise AllProvidersFailed(run.failures)

    def _result(
        self,
        final: CallResult,
        plan: Plan,
        decision: RouteDecision,
        run: _Run,
        fallback: str | None,
        fallback_reason: FallbackReason | None,
    ) -> MoAResult:
        usage = sum((r.usage for r in run.records), start=type(final.usage)())
        return MoAResult(
            text=final.text,
            preset=decision.preset,
            plan=plan,
            decision=decision,
            provider=final.provider,
            model=final.model or final.requested_model,
            finish_reason=final.finish_reason,
            calls=run.records,
            usage=usage,
            cost_usd=sum(r.cost_usd for r in run.records),
            wall_time_s=run.offset(),
            critical_path_s=run.critical_path_s,
            simulated_critical_path_s=run.simulated_critical_s,
            fallback=fallback,
            fallback_reason=fallback_reason,
            notes=run.notes,
        )


_PIECE = re.compile(r"\S+\s*|\s+")


def _replay_pieces(text: str, words: int = 6) -> list[str]:
    """A cached answer streamed again: a few words per SSE chunk, as a model would send them."""
    parts = _PIECE.findall(text)
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)] or [text]


def _as_aggregator(ref: ModelRef) -> AggregatorSpec:
    return ref if isinstance(ref, AggregatorSpec) else AggregatorSpec(provider=ref.provider, model=ref.model)
