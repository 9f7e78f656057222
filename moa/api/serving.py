"""The API's request handling, apart from its HTTP routes (``moa.api.app``): the one preamble
both answering endpoints share (``Api.prepare``), running an admitted request to its answer or to
its stream's first event, and the state the service shares between requests (access, admission,
the drain, the metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from moa.api.access import BATCH_KEY_SCOPE, Access, settle_quietly
from moa.api.admission import Admission, Slot
from moa.api.batch_worker import BatchGate, BatchWorker
from moa.api.body import parse, read_json
from moa.api.cancel import BACKSTOP_GRACE_S, until_done
from moa.api.drain import CUT_GRACE_S, Drain
from moa.api.errors import bad_messages, moa_error
from moa.api.gate import SpendGate
from moa.api.health import HealthFn
from moa.api.outcomes import Outcomes
from moa.api.priority import client_marked_batch
from moa.api.schemas import ParamError, RunBody, RunFields, RunSpec
from moa.api.sse import SseWriter
from moa.api.streaming import EventPump
from moa.auth import Principal
from moa.cache import CacheTicket
from moa.config import MoAConfig
from moa.deadline import Deadline
from moa.engine.context import RunOptions
from moa.engine.engine import MoAEngine
from moa.errors import DeadlineExceeded, InvalidPlan
from moa.eval.shadow import ShadowEvaluator
from moa.result import MoAResult, Progress
from moa.types import ChatMessage, TextDelta, priced_messages
from moa_observability.asgi import END_USER_STATE
from moa_observability.metrics import RequestMetrics

B = TypeVar("B", bound=RunBody)


@dataclass
class Prepared:
    """A request past the preamble: who asks, its messages and what it asks for; admitted (its
    ``slot``), its spend gated, its deadline and cache rights set. Released exactly once
    (``close``): by its endpoint, or by the stream's response once that owns it."""

    principal: Principal
    messages: list[ChatMessage]
    spec: RunSpec
    gate: SpendGate
    slot: Slot
    deadline: Deadline
    ticket: CacheTicket | None
    tenant: str
    t0: float

    def options(self) -> RunOptions:
        """What the engine's ``run`` or ``stream`` gets for this request."""
        spec = self.spec
        options: RunOptions = {"preset": spec.preset, "plan": spec.plan, "params": spec.params}
        options |= {"deadline": self.deadline, "aggregation": spec.options.aggregation}
        options |= {"tenant": self.tenant, "ticket": self.ticket}
        options |= {"tools": spec.tools, "tool_mode": spec.options.tool_mode}
        options |= {"response_format": spec.response_format}
        options |= {"choices": spec.choices}
        return options | self.gate.hooks()

    async def close(self) -> None:
        self.slot.release()
        await settle_quietly(self.gate.spend)


class Api:
    """Request handling, kept apart from FastAPI wiring so each piece stays small. ``access``:
    who may call and what a call may spend (keys and budgets, with a state store)."""

    def __init__(self, config: MoAConfig, engine: MoAEngine, health: HealthFn, access: Access) -> None:
        self.config, self.engine, self.health, self.access = config, engine, health, access
        self.metrics = RequestMetrics()
        self.admission = Admission(
            config.server.max_concurrent_requests, config.server.key_concurrency_share, self.metrics.shed
        )
        # eval.shadow: answered requests sampled for a background comparison with a baseline.
        self.shadow = ShadowEvaluator(config, engine.caller) if config.eval.shadow.enabled else None
        self.outcomes = Outcomes(self.metrics, self.shadow)
        self.shutdown = Drain(self.admission, self.access)
        self.sse = SseWriter(config.server.sse_keepalive_s, self.outcomes, self.shutdown)
        # The Batch API's background work (with a state store: ``moa.api.app.create_api``).
        self.batch_worker: BatchWorker | None = None
        # Batch work's share of this replica: the Batch API's requests and the ones clients mark.
        self.batch_gate = BatchGate(self.admission, config.batch.concurrency, config.batch.yield_at)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    async def drain(self, drain_s: float) -> int:
        """See ``Drain.drain``: how many requests were still running when ``drain_s`` ran out.
        The Batch API's batches take no more requests from the start of it (those in progress
        finish within it), and let their leases go at its end: they go on elsewhere, or later."""
        if self.batch_worker is not None:
            self.batch_worker.stop_taking()
        end = time.monotonic() + drain_s
        cut = await self.shutdown.drain(drain_s)
        await self.close(max(end - time.monotonic(), CUT_GRACE_S))
        return cut

    async def close(self, grace_s: float = 0.0) -> None:
        """Ends the background batch work, its runs given ``grace_s`` to end on their own (see
        ``BatchWorker.close``), and lets its leases go: when the app is done with."""
        if self.batch_worker is not None:
            await self.batch_worker.close(grace_s)

    def hurry(self) -> None:
        """End a drain now: requests still in progress are ended as if the drain time had run out."""
        self.shutdown.hurry()

    def tenant(self, principal: Principal) -> str:
        """Whose request this is, for everything that remembers requests (the response cache, the
        router's classifier cache): the API key (its name; names are never reused), or the scope
        the operator shares between keys, or ``open`` without keys."""
        if principal.key is None:
            return "open"
        shared = self.config.cache.shared_scopes.get(principal.key.name)
        return f"shared:{shared}" if shared else f"key:{principal.key.name}"

    def cache_ticket(self, principal: Principal, options: RunFields) -> CacheTicket | None:
        """This request's cache rights, handed to the engine with the run (``Prepared.options``).
        Entries are scoped by the API key (its name), or by the scope the operator shares between
        keys."""
        if self.engine.cache is None:
            return None
        scope = self.tenant(principal)
        # The request may allow reusing a sample; so may the operator, for the whole key.
        sampled_ok = options.cache_sampled or principal.limits.cache_sampled
        return CacheTicket.for_request(scope, options.cache, options.cache_semantic, sampled_ok)

    def deadline(self, requested: float | None) -> Deadline:
        """The request's one deadline, from now: what it asked for (``moa.deadline_s``), at most
        the server's ``request_deadline_s``. The engine and the backstop share it."""
        limit = self.config.server.request_deadline_s
        return Deadline.after(min(requested, limit) if requested else limit)

    # -- the request preamble ---------------------------------------------------------------------

    async def prepare(self, request: Request, schema: type[B]) -> tuple[B, Prepared]:
        """What every answering endpoint does before it runs: the caller (its key, its rate
        limits), the body read and validated as ``schema``, the messages, the key's rights to
        what is asked, the spend gate, a slot (429 past capacity, 503 while draining), the
        deadline and the cache rights. Everything that refuses comes before the slot is taken."""
        batch_key = request.scope.get(BATCH_KEY_SCOPE)
        principal = await self.access.principal(request.headers.get("authorization"), batch_key)
        req = parse(schema, await read_json(request, self.config.server.max_request_bytes))
        if req.end_user is not None:  # for the request's span and log line (TracingMiddleware)
            setattr(request.state, END_USER_STATE, req.end_user)
        try:
            messages = req.chat_messages()
            spec = req.run_spec()  # its tools are checked as OpenAI's API checks them
        except ParamError as e:
            raise bad_messages(e) from None
        self.check(principal, spec)
        # The tool definitions and the format's schema are prompt tokens too: the projection and
        # the caps count them.
        priced = priced_messages(messages, spec.tools, spec.response_format)
        gate = SpendGate(self.access, principal, priced, spec, self.engine.health)
        slot = await self.take_slot(request, principal)
        t0 = time.monotonic()
        deadline = self.deadline(spec.options.deadline_s)
        ticket = self.cache_ticket(principal, spec.options)
        tenant = self.tenant(principal)
        return req, Prepared(principal, messages, spec, gate, slot, deadline, ticket, tenant, t0)

    async def take_slot(self, request: Request, principal: Principal) -> Slot:
        """The request's slot (429 past capacity, 503 while draining). A request its client marked
        as batch work waits for its turn at the batch gate first (after the interactive load, at
        most ``batch.concurrency`` of them at once, and until its key has room on this replica:
        a batch is patient, so it waits where another request would get a 429), and holds it as
        long as the slot."""
        if not client_marked_batch(request.scope):
            return self.admission.take(principal)
        # No turn while draining: the take then refuses.
        turn = await self.batch_gate.wait_turn(lambda: self.admission.has_room(principal))
        try:
            slot = self.admission.take(principal)
        except BaseException:
            if turn:
                self.batch_gate.end_turn()
            raise
        return slot.then(self.batch_gate.end_turn) if turn else slot

    def check(self, principal: Principal, spec: RunSpec) -> None:
        """The key's rights to what the request asks for, before anything runs: its preset (or
        model), or a custom plan (whose models must all be configured here), and the detail."""
        if spec.plan is not None:
            problems = self.config.unknown_models(spec.plan)
            if problems:
                error = InvalidPlan(f"the plan cannot run here: {'; '.join(problems)}")
                error.param = "plan"
                raise moa_error(error)
            principal.check_custom_plan()
        else:
            preset = spec.preset or self.config.default_preset
            principal.check_model(preset, preset == "auto" or preset in self.config.presets)
        principal.check_detail(spec.detail)

    # -- running ----------------------------------------------------------------------------------

    async def answer(self, request: Request, run: Prepared) -> MoAResult:
        """The whole answer; routing happens inside the run (its span is the run's child)."""
        work = self.engine.run(run.messages, **run.options())
        return await until_done(request, work, run.deadline, self.shutdown.cut())

    async def open_stream(
        self, request: Request, run: Prepared
    ) -> tuple[TextDelta | MoAResult | Progress, EventPump]:
        """The stream's first event (``admitted``: routed, admitted, within the caps), waited for
        so that refusals get a real status code, and the events that follow it. From then on the
        stream ends at the deadline (plus the grace), whatever the transports do."""
        events = EventPump(self.engine.stream(run.messages, **run.options()))
        self.shutdown.streams.add(events)
        try:
            first = await until_done(request, events.next(), run.deadline, self.shutdown.cut())
            events.stop_at(
                run.deadline.extended(BACKSTOP_GRACE_S),
                DeadlineExceeded("the request deadline passed before the answer was complete"),
            )
        except BaseException:
            self.shutdown.streams.discard(events)
            await events.aclose()
            raise
        return first, events
