"""One proposer layer (or refine round): its calls run concurrently until the quorum is met and the
grace period is over, or until the layer's (or the request's) deadline; the rest are stragglers.

What differs between the aggregation modes comes in with the job: how long the layer waits past its
quorum (``Grace``: none for early aggregation), and how its proposers start (``Proposers``): asked
once each (``DirectCalls``), or, in a staircase, streaming into the layer's feed or stepping over
the layer before (``moa.engine.modes.staircase``). The layer itself never asks which mode runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from moa.deadline import Deadline
from moa.engine import spans
from moa.engine.calls import UNSEEN_BATCH_S, collect, cut_result, fit_call, merge_params, provider_kind
from moa.engine.context import RunContext
from moa.engine.prompts import extend_system, with_references
from moa.engine.structured import instruction
from moa.engine.toolcalls import reference_text
from moa.plan import LayerSpec, ProposerSpec
from moa.result import CallRecord, Progress, Stage
from moa.types import CallError, CallRequest, CallResult, ErrorKind
from moa_observability.tracing import tracer

# Why waiting stopped with calls still running, when it was the deadline (they timed out).
_DEADLINE = "layer deadline passed"

Tasks = dict[asyncio.Task[CallResult], int]


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
        """The answers as the next stage reads them: each text, with the calls it proposes."""
        return [reference_text(res) for res in self.answered]


@dataclass(frozen=True)
class Grace:
    """How long a layer still waits for its other proposers once its quorum is met, and what the
    ones it then cuts are told (``why`` follows "quorum met; ")."""

    seconds: float
    why: str


@dataclass(frozen=True)
class LayerJob:
    """One proposer stage: layer ``index`` (1-based) of ``spec`` over ``references`` (the answers of
    the stage before), or refine round ``round`` (``refine``: improving the previous answer)."""

    index: int
    spec: LayerSpec
    grace: Grace
    references: list[str] = field(default_factory=list)
    refine: bool = False
    round: int | None = None


class Proposers(Protocol):
    """How a layer's proposers start, and what one the layer cuts short costs."""

    # Whether each proposer's calls are recorded as they run (a stepped proposer's chain records
    # every step): the layer then records only the ones it cuts, and a cancelled layer none.
    recorded: bool

    async def start(self, ctx: RunContext, job: LayerJob, clock: Callable[[], float]) -> Tasks:
        """Start the proposers (task to proposer index). ``clock()`` starts the layer's own clock
        and returns the timeout of each call it makes."""
        ...

    def cut(self, i: int, kind: ErrorKind, why: str, latency_s: float) -> CallResult:
        """Proposer ``i``'s call, cut short: what its provider bills for it."""
        ...


async def run_layer(ctx: RunContext, job: LayerJob, proposers: Proposers | None = None) -> LayerOutcome:
    """Run ``job``; its proposers are asked once each unless ``proposers`` says otherwise."""
    attrs = spans.layer_attributes(job.index, job.spec, job.round)
    with tracer().start_as_current_span("moa.layer", attributes=attrs) as span:
        outcome = await _run(ctx, job, proposers or DirectCalls())
        spans.layer_done(span, outcome)
        return outcome


async def _run(ctx: RunContext, job: LayerJob, proposers: Proposers) -> LayerOutcome:
    ctx.deadline.check()
    started_s = ctx.offset()
    clock = _Clock(ctx)
    tasks = await proposers.start(ctx, job, clock.start)
    waiting = _Waiting(ctx, job, proposers, tasks, started_s)
    try:
        await waiting.run(clock.stage)
    except BaseException:
        # The layer itself was cancelled (the client left, a staircase run turned to its fallback)
        # or failed: its calls still reached their providers, and each is billed before it goes.
        await _cancel(waiting.tasks)
        waiting.cancelled(time.monotonic() - clock.at)
        raise
    finally:
        await _cancel(waiting.pending)
    return waiting.outcome(time.monotonic() - clock.at)


async def _cancel(tasks: Collection[asyncio.Task[CallResult]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class _Clock:
    """The layer's own clock: it starts when its proposers' calls may start (a stepped layer's once
    the layer it reads is done), under the layer's deadline or the request's, whichever is first."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.at = time.monotonic()
        self.stage = ctx.deadline

    def start(self) -> float:
        plan = self.ctx.plan
        self.at = time.monotonic()
        self.stage = self.ctx.deadline.within(plan.layer_deadline_s)
        return max(self.stage.cap(plan.call_timeout_s), 0.001)


class _Waiting:
    """Waiting on a layer's calls: until its quorum is met and its grace is over, its quorum is out
    of reach, or its deadline; the results so far, the calls still running, and why it stopped."""

    def __init__(
        self, ctx: RunContext, job: LayerJob, proposers: Proposers, tasks: Tasks, started_s: float
    ) -> None:
        self.ctx, self.job, self.proposers, self.tasks = ctx, job, proposers, tasks
        self.started_s = started_s  # when the layer started (a stepped one, before its clock)
        self.results: dict[int, CallResult] = {}
        self.pending: set[asyncio.Task[CallResult]] = set(tasks)
        # Why waiting stopped with calls still running; they are cancelled as stragglers.
        self.stop = _DEADLINE

    def _progress(self, done: int) -> None:
        ctx, layer = self.ctx, self.job.spec
        if ctx.progress is not None:
            ctx.progress(
                Progress(
                    stage="proposers",
                    layer=self.job.index,
                    layers=ctx.layers,
                    proposers_done=done,
                    proposers=len(layer.proposers),
                    quorum=layer.needed,
                )
            )

    async def run(self, stage: Deadline) -> None:
        needed, total = self.job.spec.needed, len(self.job.spec.proposers)
        grace: Deadline | None = None  # the end of the grace period, once the quorum is met
        self._progress(0)
        while self.pending:
            # Until the deadline, or the end of the grace period once the quorum is met.
            wait = stage.remaining() if grace is None else stage.cap(grace.remaining())
            if wait <= 0:
                # The grace period ended first; a layer (or request) deadline that came before it
                # is still a deadline.
                if grace is not None and grace.no_later_than(stage):
                    self.stop = "quorum met; " + self.job.grace.why
                return
            done, self.pending = await asyncio.wait(
                self.pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                self.results[self.tasks[task]] = task.result()
            succeeded = sum(r.ok for r in self.results.values())
            self._progress(succeeded)
            if succeeded >= needed and grace is None:
                grace = Deadline.after(self.job.grace.seconds)
            if total - (len(self.results) - succeeded) < needed:
                self.stop = "the quorum can no longer be reached"
                return  # do not wait for the rest

    def outcome(self, latency_s: float) -> LayerOutcome:
        """Cut the stragglers, record the layer's calls, and say whether it met its quorum."""
        ctx, job, proposers, results = self.ctx, self.job, self.proposers, self.results
        stragglers = {self.tasks[t] for t in self.pending}
        kind = ErrorKind.TIMEOUT if self.stop == _DEADLINE else ErrorKind.CANCELLED
        for i in stragglers:
            results[i] = proposers.cut(i, kind, f"cancelled as a straggler: {self.stop}", latency_s)
        answered: list[CallResult] = []
        reported: list[float] = []  # the providers' own service times, where they gave one
        for i in range(len(job.spec.proposers)):
            res, straggler = results[i], i in stragglers
            if straggler or not proposers.recorded:
                rec = _proposer_record(job, i, res, self.started_s, straggler)
                ctx.record(res, rec, built=bool(job.references))
            if not straggler and res.provider_service_s is not None:
                reported.append(res.provider_service_s)
            if res.ok:
                answered.append(res)
        ctx.add_provider_service(max(reported) if reported else None)
        met = len(answered) >= job.spec.needed
        if not met:
            ctx.deadline.check(f"the request deadline passed in layer {job.index}")
        return LayerOutcome(answered=answered, met=met, stragglers=len(stragglers))

    def cancelled(self, latency_s: float) -> None:
        """Record every call of a layer cancelled mid-way: those that answered, at their cost; the
        rest as cut. A stepped proposer's calls were recorded by its chain."""
        if self.proposers.recorded:
            return
        for task, i in self.tasks.items():
            res = self.results.get(i)
            if res is None and task.done() and not task.cancelled() and task.exception() is None:
                res = task.result()
            cut = res is None
            if res is None:
                why = "cancelled: the request ended first"
                res = self.proposers.cut(i, ErrorKind.CANCELLED, why, latency_s)
            self.ctx.record(res, _proposer_record(self.job, i, res, self.started_s, cut))


def _proposer_record(job: LayerJob, i: int, res: CallResult, started_s: float, cut: bool) -> CallRecord:
    rec = CallRecord.from_result(
        res,
        stage=Stage.PROPOSER,
        started_s=started_s,
        layer=job.index,
        round=job.round,
        role=job.spec.proposers[i].role,
    )
    rec.cancelled_straggler = cut
    return rec


def uncalled(
    ctx: RunContext, spec: ProposerSpec, kind: ErrorKind, why: str, latency_s: float = 0.0
) -> CallResult:
    """A proposer whose own call never reached its provider, or whose calls were each billed
    already (a stepped proposer's steps), ended for a reason of the run's: it costs nothing more."""
    return CallResult(
        provider=spec.provider,
        provider_kind=provider_kind(ctx.config, spec.provider),
        requested_model=spec.model,
        latency_s=latency_s,
        error=CallError(kind=kind, message=why),
    )


class DirectCalls:
    """Each proposer's model asked once, its text collected as it comes (through the response
    cache's proposal level when the run may use it), so that a call cut short is billed for the
    prompt it was asked and the text it wrote (``cut_result``), never for nothing."""

    recorded = False
    # Nobody reads the text as it comes: the transport may send it in batches.
    batch_s: float | None = UNSEEN_BATCH_S

    def __init__(self) -> None:
        self.requests: dict[int, CallRequest] = {}
        self.received: list[list[str]] = []

    async def start(self, ctx: RunContext, job: LayerJob, clock: Callable[[], float]) -> Tasks:
        self.ctx, self.job = ctx, job
        self.received = [[] for _ in job.spec.proposers]
        timeout = clock()
        tasks: Tasks = {}
        for i, spec in enumerate(job.spec.proposers):
            req = self._request(spec, timeout)
            self.requests[i] = req
            tasks[asyncio.create_task(self.call(req, i))] = i
        return tasks

    def _request(self, spec: ProposerSpec, timeout: float) -> CallRequest:
        """One proposer's request: the messages with its role prompt and the references that fit."""
        ctx, job = self.ctx, self.job
        refs, notes, _ = fit_call(
            ctx.config, job.references, spec, ctx.messages, ctx.params, ctx.plan.reference_budget_tokens
        )
        ctx.note(*(f"layer {job.index} {note}" for note in notes))
        templates = ctx.config.templates
        msgs = with_references(ctx.messages, refs, templates, refine=job.refine, role=spec.role)
        fmt = ctx.response_format if ctx.proposers_formatted else None
        if fmt is not None:
            msgs = extend_system(msgs, instruction(fmt))
        return CallRequest(
            provider=spec.provider,
            model=spec.model,
            messages=tuple(msgs),
            params=merge_params(ctx.params, spec),
            timeout_s=timeout,
            role=spec.role,
            batch_s=self.batch_s,
            tools=ctx.tools,
            response_format=fmt,
        )

    def call(self, req: CallRequest, i: int) -> Coroutine[Any, Any, CallResult]:
        return collect(self.ctx.proposal_caller, self.ctx.config, req, self.received[i])

    def text(self, i: int) -> str:
        """What proposer ``i`` has written so far."""
        return "".join(self.received[i])

    def cut(self, i: int, kind: ErrorKind, why: str, latency_s: float) -> CallResult:
        req = self.requests.get(i)
        if req is None:
            return uncalled(self.ctx, self.job.spec.proposers[i], kind, why, latency_s)
        return cut_result(self.ctx.config, req, self.text(i), kind, why, latency_s)
