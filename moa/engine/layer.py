"""One proposer layer (or refine round): its calls run concurrently until the quorum is met and the
grace period is over, or until the layer's (or the request's) deadline; the rest are stragglers.

Early aggregation has no grace: the next stage starts as soon as the quorum is met. With a
staircase ``feed``, the proposers stream their answers into it as they write them; with an
``Upstream`` too (a staircase layer after the first), the layer starts while the layer before it
still writes: each proposer is a stepped writer over that layer's feed (``stepped_proposer``), and
the layer's own clock (its deadline) starts when that layer is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from moa.deadline import Deadline
from moa.engine import spans
from moa.engine.calls import (
    UNSEEN_BATCH_S,
    collect,
    cut_result,
    fit_call,
    merge_params,
    provider_kind,
    safe_stream,
)
from moa.engine.context import RunContext
from moa.engine.prompts import with_references
from moa.engine.staircase import StaircaseFeed, stepped_proposer
from moa.plan import LayerSpec, ProposerSpec
from moa.result import CallRecord, Progress, Stage
from moa.types import CallError, CallRequest, CallResult, ErrorKind
from moa_observability.tracing import tracer

# Why waiting stopped with calls still running, when it was the deadline (they timed out).
_DEADLINE = "layer deadline passed"


@dataclass
class LayerOutcome:
    # The calls that answered, in the layer's proposer order: their texts are the next stage's
    # references, and a run whose aggregators all fail can still answer with one of them
    # (``Plan.on_aggregators_failed``).
    answered: list[CallResult]
    met: bool
    stragglers: int = 0

    @property
    def answers(self) -> list[str]:
        return [res.text for res in self.answered]


@dataclass
class Upstream:
    """The layer before a staircase layer: its answers as they stream, and its outcome to come."""

    feed: StaircaseFeed
    outcome: asyncio.Future[LayerOutcome]


async def run_layer(
    ctx: RunContext,
    index: int,
    layer: LayerSpec,
    references: list[str],
    *,
    refine: bool = False,
    round_: int | None = None,
    feed: StaircaseFeed | None = None,
    upstream: Upstream | None = None,
) -> LayerOutcome:
    """Run layer ``index`` (1-based) over ``references`` (the previous layer's answers), or, with
    ``upstream`` (and a ``feed``), over the previous layer's answers as they stream."""
    with tracer().start_as_current_span(
        "moa.layer", attributes=spans.layer_attributes(index, layer, round_)
    ) as span:
        outcome = await _calls(ctx, index, layer, references, refine, round_, feed, upstream)
        spans.layer_done(span, outcome)
        return outcome


def _call(
    ctx: RunContext, req: CallRequest, i: int, feed: StaircaseFeed | None, received: list[str]
) -> Coroutine[Any, Any, CallResult]:
    """One proposer call: streamed into the staircase feed, or streamed into ``received`` (through
    the cache when it may answer), so that a call cut short is billed for what it wrote."""
    if feed is not None:  # staircase: the answer streams into the feed as it is written
        return feed.consume(i, safe_stream(ctx.caller, ctx.config, req))
    return collect(ctx.proposal_caller, ctx.config, req, received)


def _request(
    ctx: RunContext, index: int, spec: ProposerSpec, references: list[str], refine: bool, timeout: float
) -> CallRequest:
    """One proposer's request: the messages with its role prompt and the references that fit."""
    refs, notes, _ = fit_call(
        ctx.config, references, spec, ctx.messages, ctx.params, ctx.plan.reference_budget_tokens
    )
    ctx.note(*(f"layer {index} {note}" for note in notes))
    msgs = with_references(ctx.messages, refs, ctx.config.templates, refine=refine, role=spec.role)
    return CallRequest(
        provider=spec.provider,
        model=spec.model,
        messages=tuple(msgs),
        params=merge_params(ctx.params, spec),
        timeout_s=timeout,
        role=spec.role,
    )


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


async def _calls(
    ctx: RunContext,
    index: int,
    layer: LayerSpec,
    references: list[str],
    refine: bool,
    round_: int | None,
    feed: StaircaseFeed | None,
    upstream: Upstream | None,
) -> LayerOutcome:
    plan = ctx.plan
    ctx.deadline.check()
    started_s = ctx.offset()
    tasks: dict[asyncio.Task[CallResult], int] = {}
    # What each direct proposer was asked and has written so far: what a cut call is billed for.
    bill = _Bill(ctx, index, layer, started_s, round_, feed, stepped=upstream is not None)
    if upstream is not None:
        assert feed is not None  # a stepped layer streams into its own feed for the next one
        for i, spec in enumerate(layer.proposers):
            writer = stepped_proposer(ctx, index, spec, upstream.feed, upstream.outcome)
            tasks[asyncio.create_task(feed.consume(i, writer))] = i
        try:  # the layer's clock starts once the layer it reads is done
            await _upstream_done(upstream, tasks, len(layer.proposers) - layer.needed)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    start = time.monotonic()
    # The layer's own deadline, or the request's when that comes first.
    stage = ctx.deadline.within(plan.layer_deadline_s)
    timeout = max(stage.cap(plan.call_timeout_s), 0.001)

    if upstream is None:
        for i, spec in enumerate(layer.proposers):
            req = _request(ctx, index, spec, references, refine, timeout)
            if feed is None:  # nobody reads it as it comes: its text may come in batches
                req = req.model_copy(update={"batch_s": UNSEEN_BATCH_S})
            bill.requests[i] = req
            tasks[asyncio.create_task(_call(ctx, req, i, feed, bill.received[i]))] = i

    results: dict[int, CallResult] = {}
    pending = set(tasks)
    grace: Deadline | None = None  # the end of the grace period, once the quorum is met
    needed = layer.needed
    # Early aggregation: no grace once the quorum is met, the next stage starts at once.
    early = plan.aggregation == "early"
    grace_s = 0.0 if early else plan.grace_s

    def progress(done: int) -> None:
        if ctx.progress is not None:
            ctx.progress(
                Progress(
                    stage="proposers",
                    layer=index,
                    layers=ctx.layers,
                    proposers_done=done,
                    proposers=len(layer.proposers),
                    quorum=needed,
                )
            )

    progress(0)
    # Why waiting stopped with calls still running; they are cancelled as stragglers.
    stop_reason = _DEADLINE
    try:
        while pending:
            # Until the deadline, or the end of the grace period once the quorum is met.
            wait = stage.remaining() if grace is None else stage.cap(grace.remaining())
            if wait <= 0:
                # The grace period ended first; a layer (or request) deadline that came
                # before it is still a deadline.
                if grace is not None and grace.no_later_than(stage):
                    stop_reason = "quorum met; " + ("early aggregation" if early else "grace period over")
                break
            done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[tasks[task]] = task.result()
            succeeded = sum(r.ok for r in results.values())
            progress(succeeded)
            if succeeded >= needed and grace is None:
                grace = Deadline.after(grace_s)
            failed = len(results) - succeeded
            if len(layer.proposers) - failed < needed:
                stop_reason = "the quorum can no longer be reached"
                break  # do not wait for the rest
    except BaseException:
        # The layer itself was cancelled (the client left, a staircase run turned to its fallback)
        # or failed: its calls still reached their providers, and each is billed before it goes.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bill.cancelled(tasks, results, time.monotonic() - start)
        raise
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    end = time.monotonic()
    stragglers = {tasks[t] for t in pending}
    for task in pending:
        kind = ErrorKind.TIMEOUT if stop_reason == _DEADLINE else ErrorKind.CANCELLED
        i = tasks[task]
        results[i] = bill.cut(i, kind, f"cancelled as a straggler: {stop_reason}", end - start)
    answered: list[CallResult] = []
    reported: list[float] = []  # the providers' own service times, where they gave one
    for i, spec in enumerate(layer.proposers):
        res = results[i]
        straggler = i in stragglers
        # A stepped proposer's calls were recorded as they ran (each step, the last one too).
        if straggler or upstream is None:
            rec = CallRecord.from_result(
                res, stage=Stage.PROPOSER, started_s=started_s, layer=index, round=round_, role=spec.role
            )
            rec.cancelled_straggler = straggler
            ctx.record(res, rec, built=bool(references))
        if not straggler and res.provider_service_s is not None:
            reported.append(res.provider_service_s)
        if res.ok:
            answered.append(res)
    ctx.add_provider_service(max(reported) if reported else None)
    met = len(answered) >= needed
    if not met:
        ctx.deadline.check(f"the request deadline passed in layer {index}")
    return LayerOutcome(answered=answered, met=met, stragglers=len(stragglers))


class _Bill:
    """One layer's calls as their providers bill them: what each direct proposer was asked and has
    written so far, so that a call cut short (a straggler, or every call of a cancelled layer) is
    recorded at what it cost (``cut_result``), never at nothing.

    A stepped proposer (a staircase layer after the first) is a chain of step calls, each recorded
    and billed by its chain as it ends or is cut (``answer_chain``): its straggler record only
    says it was cut, and costs nothing more."""

    def __init__(
        self,
        ctx: RunContext,
        index: int,
        layer: LayerSpec,
        started_s: float,
        round_: int | None,
        feed: StaircaseFeed | None,
        stepped: bool,
    ) -> None:
        self.ctx, self.index, self.layer, self.started_s, self.round = ctx, index, layer, started_s, round_
        self.feed, self.stepped = feed, stepped
        self.requests: dict[int, CallRequest] = {}
        self.received: list[list[str]] = [[] for _ in layer.proposers]

    def cut(self, i: int, kind: ErrorKind, why: str, latency_s: float) -> CallResult:
        """Proposer ``i``'s call, cut: billed for its prompt and the text it sent (none when stepped)."""
        req = self.requests.get(i)
        if req is None or self.stepped:
            spec = self.layer.proposers[i]
            return CallResult(
                provider=spec.provider,
                provider_kind=provider_kind(self.ctx.config, spec.provider),
                requested_model=spec.model,
                latency_s=latency_s,
                error=CallError(kind=kind, message=why),
            )
        text = self.feed.texts[i] if self.feed is not None else "".join(self.received[i])
        return cut_result(self.ctx.config, req, text, kind, why, latency_s)

    def cancelled(
        self, tasks: dict[asyncio.Task[CallResult], int], results: dict[int, CallResult], latency_s: float
    ) -> None:
        """Record every call of a layer cancelled mid-way: those that answered, at their cost; the
        rest as cut. Stepped proposers' calls were recorded by their chains."""
        if self.stepped:
            return
        for task, i in tasks.items():
            res = results.get(i)
            if res is None and task.done() and not task.cancelled() and task.exception() is None:
                res = task.result()
            cut = res is None
            if res is None:
                res = self.cut(i, ErrorKind.CANCELLED, "cancelled: the request ended first", latency_s)
            spec = self.layer.proposers[i]
            rec = CallRecord.from_result(
                res,
                stage=Stage.PROPOSER,
                started_s=self.started_s,
                layer=self.index,
                round=self.round,
                role=spec.role,
            )
            rec.cancelled_straggler = cut
            self.ctx.record(res, rec)
