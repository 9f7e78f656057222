"""The MoA engine: proposer layers with quorum and deadlines, aggregation, fallbacks, streaming.

It is transport-agnostic: every model call goes through a ``ModelCaller``. Non-streaming and
streaming runs share one pipeline and one ``RunRequest``; ``run`` simply drains it. A run is
routed and admitted here; its proposer stages run in its aggregation mode (``moa.engine.modes``:
final, early or staircase, chosen once per run and driven the same way), and its final answer in
``moa.engine.answer`` (several answers, ``n``, in ``moa.engine.choices``). The stages share one
``RunContext`` (``moa.engine.context``); a proposer layer runs in ``moa.engine.layer``, an answer
chain in ``moa.engine.chain``, the response cache's part in ``moa.engine.cached``, and span
attributes are set in ``moa.engine.spans``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Unpack

from opentelemetry import trace
from opentelemetry.context import Context

from moa.cache import ResponseCache, open_cache
from moa.caller import ModelCaller
from moa.caps import check_choices, check_messages, check_plan
from moa.config import MoAConfig
from moa.engine import cached, spans, vision
from moa.engine.answer import answer
from moa.engine.calls import check_window
from moa.engine.choices import several, unshared
from moa.engine.context import Routed, RunContext, RunOptions, RunRequest
from moa.engine.fusion import Fuser, LocalFuser
from moa.engine.modes import Proposed, mode_for
from moa.engine.router import LOCAL_TENANT, BeforeCall, Router, RouterPolicy
from moa.errors import MoAError
from moa.result import CallRecord, MoAResult, Progress, RouteDecision, Stage
from moa.types import ChatMessage, GenerationParams, HealthView, TextDelta, priced_messages
from moa_observability.tracing import attached, iterate_in, tracer

__all__ = ["MoAEngine", "Routed", "RunRequest"]


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
        tools: bool = False,
    ) -> Routed:
        """Route ``messages``: ``tenant`` scopes the router's memory of them (its classifier cache);
        ``before_classifier`` is awaited before a paid classifier call and may refuse it."""
        check_messages(self.config.caps, messages)  # before the router reads them
        with tracer().start_as_current_span("moa.route") as span:
            routed = await self.router.route(
                messages, preset, self._health(), tenant=tenant, before_call=before_classifier, tools=tools
            )
            spans.routed(span, routed[1])
            return routed

    async def run(self, messages: Sequence[ChatMessage], **options: Unpack[RunOptions]) -> MoAResult:
        """Answer ``messages`` with a preset (``auto`` routes) or an explicit plan (see ``stream``
        for the options)."""
        result: MoAResult | None = None
        async for ev in self.execute(RunRequest(messages, options, stream=False)):
            if isinstance(ev, MoAResult):
                result = ev
        assert result is not None
        return result

    def stream(
        self, messages: Sequence[ChatMessage], **options: Unpack[RunOptions]
    ) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """Yield ``Progress`` (first ``admitted``, once the plan passed routing, admission and the
        caps), the final answer's ``TextDelta``s as they arrive, then the ``MoAResult``.

        Options: ``RunOptions``, each described where it is declared.
        """
        return self.execute(RunRequest(messages, options, stream=True))

    async def execute(self, request: RunRequest) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """Run ``request``: what ``run`` and ``stream`` share. Without ``request.stream`` the final
        answer yields no ``TextDelta``s (it is only in the ``MoAResult``)."""
        t0 = time.monotonic()
        span = tracer().start_span("moa.run")
        span_ctx = trace.set_span_in_context(span)
        result: MoAResult | None = None
        ctx: RunContext | None = None
        try:
            ctx = await self._admitted(request, span_ctx, t0)
            spans.run_planned(span, ctx.decision, ctx.plan)
            if ctx.ticket is not None:
                with attached(span_ctx):  # the lookup's span is the run's child
                    hit = await cached.lookup(ctx)
                if hit is not None:
                    result = hit
                    span.set_attribute("moa.cache", hit.cache.status)
                    for replay in cached.replayed(ctx, hit):
                        yield replay
                    return
            reserve = request.options.get("reserve")
            if reserve is not None:
                await reserve()
            async for ev in iterate_in(span_ctx, self._events(ctx)):
                if isinstance(ev, MoAResult):
                    result = ev
                    await cached.store(ctx, ev, span)
                yield ev
        except MoAError as e:
            # A missed quorum still counts in the metrics.
            e.fallback_reason = ctx.fallback_reason if ctx is not None else None
            spans.failed(span, e.code)
            raise
        finally:
            if result is not None:
                spans.run_answered(span, result)
                fmt = request.options.get("response_format")
                if fmt is not None:
                    spans.structured_answer(span, fmt.type, result.refusal is not None)
            span.end()

    async def _admitted(self, request: RunRequest, span_ctx: Context, t0: float) -> RunContext:
        """The run ``request`` makes: its plan routed (or given), put through its overrides and
        ``admit``, and checked against the caps and the answering models' windows. The router's
        calls (an LLM classifier's) are paid for whatever happens next: told to ``on_call`` first,
        so a request that admission refuses is still billed for them."""
        options = request.options
        # Before routing (an LLM classifier's call is paid): how many answers, and with what.
        check_choices(self.config.caps, request.choices)
        unshared(request.choices, options.get("tools"))
        routed = options.get("routed") or await self._routed(request, span_ctx)
        routed_plan, decision, pre_calls = routed
        pre_records = [CallRecord.from_result(r, stage=Stage.CLASSIFIER, started_s=0.0) for r in pre_calls]
        on_call = options.get("on_call")
        if on_call is not None:
            for rec in pre_records:
                on_call(rec)
        # Every override first (and, for images, only the models that see them): admission
        # projects and caps the plan that will really run.
        shape = vision.shaped(self.config, request.shape, request.messages)
        routed = (shape(routed_plan), decision, pre_calls)
        admit = options.get("admit")
        if admit is not None:
            routed = await admit(routed, shape)
        plan, decision, _ = routed
        params = options.get("params") or GenerationParams()
        tools, response_format = options.get("tools"), options.get("response_format")
        held = request.contract.binding
        priced = priced_messages(request.messages, tools, response_format)
        check_messages(self.config.caps, priced)
        check_plan(self.config.caps, plan, params, len(pre_calls), request.choices)
        # The models that would answer (their windows as declared, or as their servers said).
        check_window(self.config, [*plan.aggregators, *plan.fallbacks], priced, params)
        ctx = RunContext(
            config=self.config,
            caller=self.caller,
            fuser=self.fuser,
            cache=self.cache,
            messages=list(request.messages),
            plan=plan,
            decision=decision,
            params=params,
            # With tools or a format the answer is decided and validated before the client sees
            # any of it, then replayed.
            stream=request.stream and not held,
            t0=t0,
            deadline=request.deadline,
            on_call=on_call,
            tools=tools,
            tool_mode=options.get("tool_mode") or plan.tools,
            replay=request.stream and held,
            response_format=response_format,
            choices=request.choices,
        )
        for res, rec in zip(pre_calls, pre_records, strict=True):
            ctx.record(res, rec, notify=False)
        ctx.ticket = cached.ticket(ctx, decision, request.options.get("ticket"))
        if ctx.ticket is not None:
            ctx.ticket.tools, ctx.ticket.response_format = tools, response_format
        return ctx

    async def _routed(self, request: RunRequest, span_ctx: Context) -> Routed:
        """The request's explicit plan, else the router's choice (its span the run's child)."""
        options = request.options
        plan = options.get("plan")
        if plan is not None:
            return plan, RouteDecision(preset="custom", forced=True, reason="explicit plan"), []
        with attached(span_ctx):
            return await self.route(
                request.messages,
                options.get("preset"),
                tenant=self._tenant(request),
                before_classifier=options.get("before_classifier"),
                tools=options.get("tools") is not None,
            )

    @staticmethod
    def _tenant(request: RunRequest) -> str:
        """Whose request this is: the API's (the key's scope), else the response cache's ticket's,
        else (``moa ask``) the local scope."""
        tenant = request.options.get("tenant")
        if tenant is not None:
            return tenant
        ticket = request.options.get("ticket")
        return ticket.scope if ticket is not None else LOCAL_TENANT

    async def _events(self, ctx: RunContext) -> AsyncIterator[TextDelta | MoAResult | Progress]:
        """The run once admitted: its mode's proposer stages, then the final answer."""
        yield Progress(stage="admitted", layers=ctx.layers, preset=ctx.decision.preset)
        proposed = Proposed()
        stages = mode_for(ctx.plan, ctx.stream).propose(ctx)
        async with aclosing(stages):
            async for ev in stages:
                if isinstance(ev, Proposed):
                    proposed = ev
                else:
                    yield ev
        yield Progress(stage="aggregating", layers=ctx.layers)
        final = answer(ctx, proposed) if ctx.choices == 1 else several(ctx, proposed)
        async with aclosing(final):
            async for out in final:
                yield out
