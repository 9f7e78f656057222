"""The OpenAI-compatible HTTP API as an ASGI app, independent of how the engine reaches its models.

The Ray Serve ingress serves this app with handle-based transports; tests and single-process use
serve it with the in-process provider pool. Every failure leaves as an OpenAI-style error body
with the right status; nothing leaks a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from moa.api.access import Access, SpendGate, settle_quietly
from moa.api.jsonbody import NonFiniteNumber, loads_finite
from moa.api.schemas import (
    ChatCompletionRequest,
    MoARequest,
    ParamError,
    UnknownParameter,
    error_body,
)
from moa.auth import Principal
from moa.cache import CacheTicket, set_ticket
from moa.config import ConfigError, MoAConfig
from moa.deadline import Deadline
from moa.engine.engine import MoAEngine
from moa.engine.receipts import ReceiptSource
from moa.errors import (
    DeadlineExceeded,
    InvalidPlan,
    InvalidRequest,
    MoAError,
    ShuttingDown,
    UnknownPreset,
)
from moa.eval.shadow import ShadowEvaluator
from moa.exposure import RequestExposure
from moa.keys_admin import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_MIN_CHARS,
    VERBS,
    NewKey,
    admin_key_matches,
    change_status,
    create_key,
    key_row,
    key_rows,
    spent_now,
)
from moa.result import MoAResult, Progress
from moa.state import KeyExists, StateStore, describe
from moa.textcheck import first_unencodable
from moa.types import ChatMessage, TextDelta, Usage
from moa_observability.asgi import CLIENT_CLOSED_REQUEST, END_USER_STATE, TracingMiddleware, stream_failed
from moa_observability.metrics import RequestMetrics

log = logging.getLogger("moa.api")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
HealthFn = Callable[[], Awaitable[dict[str, Any]]]

# The engine ends a request at its deadline itself; past the deadline plus this, the API stops
# waiting whatever the engine's transports do (a handle call to a deployment with no replica).
BACKSTOP_GRACE_S = 2.0
# After a drain ran out and the requests still running were told to end, how long their last
# bytes (an error event and [DONE], or a 503) get to go out.
CUT_GRACE_S = 2.0
# /healthz reports the providers' health only if it can learn it this fast.
HEALTH_TIMEOUT_S = 5.0
# How long a cancelled run's cleanup may hold its request once the request itself is cancelled
# (``ended``): it records what the run's cut calls cost, and then only closes their streams.
CLEANUP_S = 10.0


async def ended(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` (a run, or the task pumping a stream's events) and wait until it has
    ended, even if the caller is cancelled meanwhile; the caller's cancellation is raised once it
    has (or after ``CLEANUP_S``). A cancelled run's cleanup records what its cut calls cost, and
    the request's settlement, which comes next, must see every one of them.

    Why the caller may be cancelled here: on Ray, Serve cancels a request whose client left, and
    may do so while the request, having seen the client go itself, is waiting for this cleanup.
    Waiting with the cancellation suppressed went on to settle at once, and the calls the cleanup
    recorded after that (a staircase's first layer, in the spend audit) were never charged."""
    task.cancel()
    loop = asyncio.get_running_loop()
    interrupted: float | None = None
    while not task.done():
        left = None if interrupted is None else interrupted + CLEANUP_S - loop.time()
        if left is not None and left <= 0:
            break
        try:
            await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            interrupted = loop.time() if interrupted is None else interrupted
    if interrupted is not None:
        raise asyncio.CancelledError


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers: dict[str, str] = {}


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready: not a server error (recorded as 499)."""


def _moa_error(err: MoAError) -> ApiError:
    api = ApiError(err.status_code, err.message, err.error_type, err.code, err.param)
    if err.retry_after_s is not None:
        # Whole seconds, rounded up: a client that waits as told must not come back too early.
        api.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return api


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.code, err.param), status_code=err.status, headers=err.headers
    )


def _validation_message(err: ValidationError | RequestValidationError) -> tuple[str, str]:
    """The message lists every problem with its field; ``param`` names the first field at fault."""
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("body",))
        cause = (e.get("ctx") or {}).get("error")
        loc = loc or getattr(cause, "param", "")
        first = first or loc or None
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", first or "body"


def _unknown_parameter(err: ValidationError) -> UnknownParameter | None:
    """The request field OpenAI's API does not have, if that is what failed validation."""
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, UnknownParameter):
            return cause
    return None


def _bad_messages(e: ParamError) -> ApiError:
    return ApiError(400, str(e), "invalid_request_error", "invalid_request", e.param)


class Admission:
    """Admission control: at most ``limit`` requests in progress; past it, 429 at once. Once the
    service drains, every new request gets 503 at once.

    Each API key may hold at most its ``max_concurrent`` of them (by default ``key_share`` of
    ``limit``), so one key cannot take every slot. Counted here, per replica, like the slots
    themselves: it is their share that is protected, it costs no state-store round trip, and a
    replica that dies takes its counts with it (a cluster-wide count in the store would need
    expiring leases, and a leaked one would block its key until it expired). A key may so hold
    its limit on each replica at once."""

    def __init__(
        self, limit: int, key_share: float = 1.0, on_shed: Callable[[str], None] | None = None
    ) -> None:
        self.limit = limit
        # Told the code of every refusal: a shed request never reaches the request metrics.
        self._on_shed = on_shed or (lambda _: None)
        self.per_key = max(1, int(limit * key_share))
        self.in_flight = 0
        self.draining = False
        self._by_key: dict[str, int] = {}
        self._changed: asyncio.Event | None = None  # set when the count drops, while drained

    def take(self, principal: Principal | None = None) -> Slot:
        try:
            return self._take(principal)
        except ApiError as err:
            self._on_shed(err.code or "refused")
            raise

    def _take(self, principal: Principal | None) -> Slot:
        if self.draining:
            raise _moa_error(ShuttingDown("the service is shutting down; retry shortly"))
        key = principal.key if principal is not None else None
        if key is not None:
            self._check_key(key.id, key.limits.max_concurrent)
        if self.in_flight >= self.limit:
            err = ApiError(429, "the service is at capacity; retry shortly", "rate_limit_error", "overloaded")
            err.headers["Retry-After"] = "1"
            raise err
        self.in_flight += 1
        if key is None:
            return Slot(self)
        self._by_key[key.id] = self._by_key.get(key.id, 0) + 1
        return Slot(self, key.id)

    def _check_key(self, key_id: str, own: int | None) -> None:
        """429 ``concurrency_limit_exceeded`` if the key already holds its share of the slots."""
        limit = own or self.per_key
        if self._by_key.get(key_id, 0) < limit:
            return
        why = "its max_concurrent" if own else "server.key_concurrency_share of this replica's slots"
        err = ApiError(
            429,
            f"This API key already has {limit} requests in progress on this replica, its limit "
            f"({why}); retry when one of them ends.",
            "rate_limit_error",
            "concurrency_limit_exceeded",
        )
        err.headers["Retry-After"] = "1"
        raise err

    def released(self, key_id: str | None = None) -> None:
        self.in_flight -= 1
        if key_id is not None:
            left = self._by_key.pop(key_id) - 1
            if left:
                self._by_key[key_id] = left
        if self._changed is not None:
            self._changed.set()

    async def wait_idle(self, within_s: float, hurry: asyncio.Event) -> bool:
        """Wait until no request is in progress (True), ``within_s`` passes or ``hurry`` is set."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s
        while self.in_flight and not hurry.is_set() and loop.time() < end:
            self._changed = changed = asyncio.Event()
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(hurry.wait())]
            try:
                await asyncio.wait(waiters, timeout=end - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                self._changed = None
        return self.in_flight == 0


class Slot:
    """One admitted request's place. Releasing is idempotent, so every owner may release it."""

    def __init__(self, admission: Admission, key_id: str | None = None) -> None:
        self._admission: Admission | None = admission
        self._key_id = key_id

    def release(self) -> None:
        if self._admission is not None:
            self._admission.released(self._key_id)
            self._admission = None


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END: Any = object()
_STOP: Any = object()
# What ``EventPump.next`` returns when nothing came within its ``idle_s``.
IDLE: Any = object()


class EventPump:
    """A stream's events, produced in a task of their own, so the response can stop waiting for
    them at any moment (the drain ran out, the deadline passed) and still end the stream properly
    with an error event and [DONE]. One event is read ahead at most."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self._events = events
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.stopped: MoAError | None = None
        self._timer: asyncio.TimerHandle | None = None
        # A read still waiting after ``next`` stopped waiting for it (idle): the next call resumes it.
        self._read: asyncio.Future[Any] | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for ev in self._events:
                await self._queue.put(ev)
            await self._queue.put(_END)
        except Exception as e:
            await self._queue.put(_Failed(e))
        finally:
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]

    async def next(self, idle_s: float | None = None) -> Any:
        """The next event; None at the end; ``IDLE`` when none came within ``idle_s`` (the read
        goes on, nothing is lost). Raises what the events raised, or why it was stopped."""
        if self.stopped is not None:
            raise self.stopped
        if self._read is None:
            self._read = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._read}, timeout=idle_s)
        if not done:
            return IDLE
        item, self._read = self._read.result(), None
        if item is _STOP:
            assert self.stopped is not None
            raise self.stopped
        if item is _END:
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item

    def stop(self, error: MoAError) -> None:
        """End the stream with ``error``: the reader gets it now, the events are cancelled."""
        if self.stopped is not None:
            return
        self.stopped = error
        with contextlib.suppress(asyncio.QueueFull):  # full: the reader is busy and checks first
            self._queue.put_nowait(_STOP)
        self._task.cancel()

    def stop_at(self, deadline: Deadline, error: MoAError) -> None:
        """``stop(error)`` at ``deadline``, unless the stream ends first."""
        when = deadline.loop_time()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self.stop, error)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._read is not None:
            self._read.cancel()
        await ended(self._task)


class AdmittedStream(StreamingResponse):
    """A stream that owns its request's admission slot and event source: both are released when
    the response ends, however it ends (finished, failed, client gone, or never started)."""

    def __init__(
        self, content: AsyncIterator[bytes], slot: Slot, events: EventPump, spend: SpendGate | None = None
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.slot, self.events, self.spend = slot, events, spend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            try:
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
                with contextlib.suppress(Exception):
                    await self.events.aclose()
            finally:
                # After the events (even when this request was cancelled meanwhile: ``ended``):
                # every call has been counted.
                if self.spend is not None:
                    await settle_quietly(self.spend.spend)


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def moa_detail(result: MoAResult) -> dict[str, Any]:
    """The opt-in per-call breakdown (``moa: {"detail": true}``)."""
    return {
        "preset": result.preset,
        "aggregation": result.plan.aggregation,
        "decision": result.decision.model_dump(mode="json"),
        "answered_by": f"{result.provider}/{result.model}",
        "fallback": result.fallback,
        "fallback_reason": result.fallback_reason,
        "answer_source": result.answer_source,
        "notes": result.notes,
        "cache": result.cache.model_dump(mode="json"),
        "calls": [c.model_dump(mode="json") for c in result.calls],
        "totals": {
            "calls": len(result.calls),
            "cost_usd": result.cost_usd,
            "wall_time_s": result.wall_time_s,
            "critical_path_s": result.critical_path_s,
            "provider_critical_path_s": result.provider_critical_path_s,
            "stragglers_cancelled": result.stragglers_cancelled,
            # Aggregators that took over an answer another one had started streaming.
            "aggregator_switches": sum(c.took_over for c in result.calls),
            "staircase_steps": sum(c.staircase_step is not None for c in result.calls),
        },
    }


class Api:
    """Request handling, kept apart from FastAPI wiring so each piece stays small."""

    def __init__(
        self,
        config: MoAConfig,
        engine: MoAEngine,
        health: HealthFn,
        store: StateStore | None = None,
        receipts: ReceiptSource | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.health = health
        self.access = Access(config, store, receipts)
        self.metrics = RequestMetrics()
        self.admission = Admission(
            config.server.max_concurrent_requests, config.server.key_concurrency_share, self.metrics.shed
        )
        # eval.shadow: answered requests sampled for a background comparison with a baseline.
        self.shadow = ShadowEvaluator(config, engine.caller) if config.eval.shadow.enabled else None
        # Streams under way, so that a drain that runs out can end each of them properly.
        self._streams: set[EventPump] = set()
        # Resolved when a drain runs out: requests still waiting for an answer stop waiting.
        self._cut: asyncio.Future[None] | None = None
        self._hurry: asyncio.Event | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def tenant(self, principal: Principal) -> str:
        """Whose request this is, for everything that remembers requests (the response cache, the
        router's classifier cache): the API key (its name; names are never reused), or the scope
        the operator shares between keys, or ``open`` without keys."""
        if principal.key is None:
            return "open"
        shared = self.config.cache.shared_scopes.get(principal.key.name)
        return f"shared:{shared}" if shared else f"key:{principal.key.name}"

    def cache_ticket(
        self, principal: Principal, mode: str, semantic: bool, sampled_ok: bool
    ) -> CacheTicket | None:
        """This request's cache rights, set for the engine and every task it starts. Entries are
        scoped by the API key (its name), or by the scope the operator shares between keys."""
        if self.engine.cache is None:
            set_ticket(None)
            return None
        scope = self.tenant(principal)
        # The request may allow reusing a sample; so may the operator, for the whole key.
        sampled_ok = sampled_ok or principal.limits.cache_sampled
        ticket = CacheTicket.for_request(scope, mode, semantic, sampled_ok)
        set_ticket(ticket)
        return ticket

    def _cut_future(self) -> asyncio.Future[None]:
        if self._cut is None:
            self._cut = asyncio.get_running_loop().create_future()
        return self._cut

    def _hurry_event(self) -> asyncio.Event:
        if self._hurry is None:
            self._hurry = asyncio.Event()
        return self._hurry

    async def drain(self, drain_s: float) -> int:
        """Shut down gracefully: refuse new requests (503) from now on, give those in progress up
        to ``drain_s`` to finish, then end the rest: an unfinished stream gets an error event
        (``shutting_down``) and [DONE], a request still waiting for its answer a 503. Returns how
        many were ended that way. ``hurry()`` (a second Ctrl-C) ends them at once."""
        self.admission.draining = True
        log.info("draining", extra={"event": "drain", "status": self.admission.in_flight})
        hurry = self._hurry_event()
        if await self.admission.wait_idle(drain_s, hurry):
            await self.access.settled()
            return 0
        cut = self.admission.in_flight
        log.warning("drain time over: ending %d request(s)", cut, extra={"event": "drain_cut", "status": cut})
        if not self._cut_future().done():
            self._cut_future().set_result(None)
        for stream in list(self._streams):
            stream.stop(ShuttingDown("the service is shutting down: the answer was cut short"))
        await self.admission.wait_idle(CUT_GRACE_S, asyncio.Event())
        await self.access.settled()
        return cut

    def hurry(self) -> None:
        """End a drain now: requests still in progress are ended as if the drain time had run out."""
        self._hurry_event().set()

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    # -- input ------------------------------------------------------------------------------------

    async def read_json(self, request: Request) -> Any:
        limit = self.config.server.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"request body exceeds {limit} bytes", "invalid_request_error", "body_too_large"
                )
            chunks.append(chunk)
        try:
            body = loads_finite(b"".join(chunks))
        except NonFiniteNumber as e:
            raise ApiError(400, str(e), "invalid_request_error", "invalid_number") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(
                400, f"request body is not valid JSON: {e}", "invalid_request_error", "invalid_json"
            ) from None
        except RecursionError:
            raise ApiError(
                400, "request body is nested too deeply to parse", "invalid_request_error", "invalid_json"
            ) from None
        # Text no encoder can write (a lone surrogate escape) would fail at every provider: refuse
        # it here, naming the field, before anything is sent.
        where = first_unencodable(body)
        if where is not None:
            raise ApiError(
                400,
                f"{where}: contains a lone UTF-16 surrogate, which is not valid Unicode text",
                "invalid_request_error",
                "invalid_encoding",
                where,
            )
        return body

    def parse(self, model: type[M], body: Any) -> M:
        if not isinstance(body, dict):
            raise ApiError(
                400, "request body must be a JSON object", "invalid_request_error", "invalid_request"
            )
        try:
            return model.model_validate(body)
        except (ValidationError, RecursionError) as e:
            if isinstance(e, RecursionError):
                raise ApiError(
                    400, "request body is nested too deeply", "invalid_request_error", "invalid_request"
                ) from None
            unknown = _unknown_parameter(e)
            if unknown is not None:  # as OpenAI answers a field it does not have: a 400
                raise ApiError(
                    400, str(unknown), "invalid_request_error", "unknown_parameter", unknown.param
                ) from None
            message, param = _validation_message(e)
            raise ApiError(422, message, "invalid_request_error", "invalid_value", param) from None

    def deadline(self, requested: float | None) -> Deadline:
        """The request's one deadline, from now: what it asked for (``moa.deadline_s``), at most
        the server's ``request_deadline_s``. The engine and the backstop below share it."""
        limit = self.config.server.request_deadline_s
        return Deadline.after(min(requested, limit) if requested else limit)

    # -- endpoints --------------------------------------------------------------------------------

    async def until_done(self, request: Request, work: Awaitable[T], deadline: Deadline) -> T:
        """Await ``work``, cancelling it (and with it the whole fan-out) if the client goes away
        (``ClientDisconnected``), a drain runs out (``ShuttingDown``) or the request's deadline
        passed well beyond what the engine allows itself (``DeadlineExceeded``)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        cut = self._cut_future()
        try:
            waits: set[asyncio.Future[Any]] = {task, watcher, cut}
            limit = deadline.remaining() + BACKSTOP_GRACE_S
            done, _ = await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                await ended(task)
        if task in done or (task.done() and not task.cancelled()):
            return task.result()
        if watcher in done:
            raise ClientDisconnected("client disconnected")
        if cut in done:
            raise ShuttingDown("the service is shutting down: the request did not finish in time")
        raise DeadlineExceeded("the request deadline passed before an answer was ready")

    async def chat_completions(self, request: Request) -> Response:
        principal = await self.access.principal(request.headers.get("authorization"))
        req = self.parse(ChatCompletionRequest, await self.read_json(request))
        if req.end_user is not None:  # for the request's span and log line (TracingMiddleware)
            setattr(request.state, END_USER_STATE, req.end_user)
        try:
            messages = req.chat_messages()
        except ParamError as e:
            raise _bad_messages(e) from None
        principal.check_model(req.model, req.model == "auto" or req.model in self.config.presets)
        principal.check_detail(req.moa.detail)
        gate = SpendGate(
            self.access, principal, messages, req.params(), req.moa.max_cost_usd, self.engine.health
        )
        slot = self.admission.take(principal)
        response: Response | None = None
        t0 = time.monotonic()
        deadline = self.deadline(req.moa.deadline_s)
        ticket = self.cache_ticket(principal, req.moa.cache, req.moa.cache_semantic, req.moa.cache_sampled)
        try:
            # Routing happens inside the run (its span is the run's child); a routing error still
            # comes before any byte of the response, so it gets its real status.
            kwargs: dict[str, Any] = {"preset": req.model, "params": req.params(), "deadline": deadline}
            kwargs |= {"admit": gate.admit, "reserve": gate.reserve, "on_call": gate.record}
            kwargs |= {"tenant": self.tenant(principal), "before_classifier": gate.before_classifier}
            kwargs["aggregation"] = req.moa.aggregation
            if not req.stream:
                result = await self.until_done(request, self.engine.run(messages, **kwargs), deadline)
                self.record(result, 200, time.monotonic() - t0)
                if self.shadow is not None:
                    self.shadow.offer(messages, result, req.model)  # starts a task; never waits
                headers = _cache_header(ticket) | _preset_header(result.preset) | _answer_header(result)
                return JSONResponse(self.completion_body(req, result), headers=headers | _cost_header(result))
            events = EventPump(self.engine.stream(messages, **kwargs))
            self._streams.add(events)
            try:
                # Wait for the first event (``admitted``: routed, admitted, within the caps) so that
                # refusals get a real status code; from then on headers and bytes go out at once.
                first = await self.until_done(request, events.next(), deadline)
                # Whatever the transports do, the stream ends at the deadline (plus the grace).
                events.stop_at(
                    deadline.extended(BACKSTOP_GRACE_S),
                    DeadlineExceeded("the request deadline passed before the answer was complete"),
                )
            except BaseException:
                self._streams.discard(events)
                await events.aclose()
                raise
            # From here the response owns the slot and the events (see AdmittedStream).
            ran = first.preset if isinstance(first, Progress | MoAResult) else None
            response = AdmittedStream(self.sse(req, first, events, t0, ran), slot, events, gate)
            response.headers.update(_cache_header(ticket) | _preset_header(ran))
            return response
        except MoAError as e:
            self.metrics.record(req.model, None, e.status_code, time.monotonic() - t0, e.fallback_reason)
            raise
        finally:
            if response is None:
                slot.release()
                await settle_quietly(gate.spend)

    def record(self, result: MoAResult, status: int, seconds: float) -> None:
        complexity = result.decision.complexity.value if result.decision.complexity else None
        self.metrics.record(
            result.preset,
            complexity,
            status,
            seconds,
            result.fallback_reason,
            result.decision.classifier_cached,
            cost_usd=result.cost_usd,
            critical_path_s=result.critical_path_s,
        )

    def completion_body(self, req: ChatCompletionRequest, result: MoAResult) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": f"chatcmpl-moa-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answered_model(req.model, result.preset),
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish_reason(result.finish_reason),
                }
            ],
            "usage": _usage(result.usage),
        }
        if req.moa.detail:
            body["moa"] = moa_detail(result)
        return body

    async def sse(
        self,
        req: ChatCompletionRequest,
        first: TextDelta | MoAResult | Progress,
        events: EventPump,
        t0: float,
        ran: str | None = None,
    ) -> AsyncIterator[bytes]:
        """The response's SSE bytes: the role chunk at once, then the answer's chunks. While there
        is nothing to send (the proposers at work), a comment line every ``server.sse_keepalive_s``
        keeps proxies from taking the connection for idle; with ``moa.progress`` the client also
        gets a chunk with no choices and a ``moa.progress`` field at each step. An error after the
        headers went out ends the stream with an OpenAI-style error event and [DONE]."""
        ident, created = f"chatcmpl-moa-{uuid.uuid4().hex[:24]}", int(time.time())
        model = answered_model(req.model, ran)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            body |= {"system_fingerprint": None, "choices": choices, **extra}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        def progress_chunk(p: Progress) -> bytes:
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            body |= {"system_fingerprint": None, "choices": [], "moa": {"progress": p.model_dump()}}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        ev: TextDelta | MoAResult | Progress | None = first
        stage = "admitted"
        first_token = False
        idle_s = self.config.server.sse_keepalive_s
        try:
            while ev is not None:
                if ev is IDLE:
                    yield f": keep-alive ({stage})\n\n".encode()
                elif isinstance(ev, Progress):
                    stage = ev.describe()
                    if req.moa.progress:
                        yield progress_chunk(ev)
                elif isinstance(ev, TextDelta):
                    if ev.text and not first_token:
                        first_token = True
                        self.metrics.first_token(ran or req.model, time.monotonic() - t0)
                    yield chunk({"content": ev.text})
                else:
                    result = ev
                    self.record(result, 200, result.wall_time_s)
                    if self.shadow is not None:
                        self.shadow.offer(req.chat_messages(), result, req.model)
                    yield chunk({}, _finish_reason(result.finish_reason))
                    extra: dict[str, Any] = {"moa": moa_detail(result)} if req.moa.detail else {}
                    include_usage = req.stream_options is not None and req.stream_options.include_usage
                    if include_usage or extra:
                        usage = _usage(result.usage) if include_usage else None
                        body = {"id": ident, "object": "chat.completion.chunk", "created": created}
                        body |= {"model": model, "choices": [], "usage": usage, **extra}
                        yield b"data: " + json.dumps(body).encode() + b"\n\n"
                ev = await events.next(idle_s)
        except MoAError as e:
            # Text may already be out: the error travels in the stream, as OpenAI's API does. The
            # request is counted and logged with the error's status, not the 200 of its headers.
            self.metrics.record(req.model, None, e.status_code, time.monotonic() - t0, e.fallback_reason)
            stream_failed(e.status_code)
            yield b"data: " + json.dumps(error_body(e.message, e.error_type, e.code)).encode() + b"\n\n"
        finally:
            self._streams.discard(events)
        yield b"data: [DONE]\n\n"

    async def moa(self, request: Request) -> Response:
        principal = await self.access.principal(request.headers.get("authorization"))
        req = self.parse(MoARequest, await self.read_json(request))
        try:
            messages: list[ChatMessage] = req.chat_messages()
        except ParamError as e:
            raise _bad_messages(e) from None
        if req.plan is not None:
            problems = self.config.unknown_models(req.plan)
            if problems:
                error = InvalidPlan(f"the plan cannot run here: {'; '.join(problems)}")
                error.param = "plan"
                raise _moa_error(error)
            principal.check_custom_plan()
        else:
            preset = req.preset or self.config.default_preset
            principal.check_model(preset, preset == "auto" or preset in self.config.presets)
        principal.check_detail(True)  # the full result is the detail
        ticket = self.cache_ticket(principal, req.cache, req.cache_semantic, req.cache_sampled)
        slot = self.admission.take(principal)
        deadline = self.deadline(req.deadline_s)
        gate = SpendGate(
            self.access,
            principal,
            messages,
            req.params,
            req.max_cost_usd,
            self.engine.health,
            "plan" if req.plan is not None else "preset",
        )
        try:
            result = await self.until_done(
                request,
                self.engine.run(
                    messages,
                    preset=req.preset,
                    plan=req.plan,
                    params=req.params,
                    deadline=deadline,
                    admit=gate.admit,
                    reserve=gate.reserve,
                    on_call=gate.record,
                    aggregation=req.aggregation,
                    tenant=self.tenant(principal),
                    before_classifier=gate.before_classifier,
                ),
                deadline,
            )
        except UnknownPreset as e:
            e.param = "preset"  # this endpoint's field for it
            raise
        finally:
            slot.release()
            await settle_quietly(gate.spend)
        headers = _cache_header(ticket) | _answer_header(result)
        return JSONResponse(result.model_dump(mode="json"), headers=headers)

    def _model_objects(self) -> list[dict[str, Any]]:
        presets = ["auto", *self.config.presets]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "moa"} for name in presets]
        data += [
            {"id": f"{p}/{m}", "object": "model", "created": 0, "owned_by": p}
            for p, m in self.config.all_models()
        ]
        return data

    async def models(self, request: Request) -> dict[str, Any]:
        await self.access.principal(request.headers.get("authorization"))
        return {"object": "list", "data": self._model_objects()}

    async def model(self, request: Request, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}`` (``client.models.retrieve``): one entry of the list, or OpenAI's
        404 ``model_not_found``."""
        await self.access.principal(request.headers.get("authorization"))
        for entry in self._model_objects():
            if entry["id"] == model_id:
                return entry
        raise _moa_error(UnknownPreset(f"The model {model_id!r} does not exist"))

    async def healthz(self, detail: bool = False) -> Response:
        """``ok`` when every provider can answer; ``degraded`` (200) when some cannot; ``down``
        (503) when none can; ``draining`` (503) once shutdown began. A provider can answer when it
        has a running replica (on Ray) whose circuit is not open.

        Probes need no key, so by default the body is the status alone: each provider's state,
        call counts and latency tell anyone who can reach the port which providers a deployment
        pays for and how busy it is. ``detail`` (the admin key was presented) adds them."""
        if self.draining:
            return _health_response({"status": "draining", "providers": {}}, 503, detail)
        try:
            providers = await asyncio.wait_for(self.health(), HEALTH_TIMEOUT_S)
        except Exception as e:
            why = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            body = {"status": "unknown", "providers": {}, "error": f"provider health unavailable: {why}"}
            return _health_response(body, 503, detail)
        up = sum(_can_answer(p) for p in providers.values())
        status = "ok" if up == len(providers) else "degraded" if up else "down"
        return _health_response({"status": status, "providers": providers}, 200 if up else 503, detail)


def _health_response(body: dict[str, Any], status: int, detail: bool) -> JSONResponse:
    return JSONResponse(body if detail else {"status": body["status"]}, status_code=status)


def answered_model(requested: str, ran: str | None) -> str:
    """The response's ``model``: what ``auto`` resolved to (the preset that ran), as OpenAI
    answers with the resolved model; any other request's own ``model``."""
    return ran if requested == "auto" and ran else requested


def _preset_header(ran: str | None) -> dict[str, str]:
    """``x-moa-preset``: the preset (or ``provider/model``) that answered."""
    return {"x-moa-preset": ran} if ran else {}


def _cache_header(ticket: CacheTicket | None) -> dict[str, str]:
    """``x-moa-cache``: hit-exact, hit-semantic, miss, or bypass (not read: the request said so,
    a fresh sample was asked for, or the cache is off)."""
    return {"x-moa-cache": ticket.outcome.status if ticket is not None else "bypass"}


def _answer_header(result: MoAResult) -> dict[str, str]:
    """``x-moa-answer-source``: aggregator, fallback, or proposal (every aggregator failed and a
    proposal answered unaggregated). A streamed response's headers leave before the answer is
    known: there it is only in ``moa.detail``."""
    return {"x-moa-answer-source": result.answer_source}


def _cost_header(result: MoAResult) -> dict[str, str]:
    """``x-moa-cost-usd``: what the request's calls cost, in US dollars, when it was answered (a
    call it cut may be charged a little more once its provider says what it consumed). The caller's
    own spend, so it is sent to every caller, with or without ``moa.detail``; ``moa batch`` counts
    its budget with it."""
    return {"x-moa-cost-usd": f"{result.cost_usd:.8f}"}


def _can_answer(health: dict[str, Any]) -> bool:
    # In-process there is one client per provider; on Ray, "replicas" counts those reporting.
    if health.get("state") == "scaled_to_zero":
        return True  # autoscaled down to none: a request brings a replica back
    return health.get("replicas", 1) > 0 and health.get("state") in ("closed", "half_open", "degraded")


class Admin:
    """``/admin/keys``: the admin HTTP API, guarded by the admin key (``MOA_ADMIN_KEY``). It
    exists only when that key is set and the service has a state store; otherwise every
    ``/admin`` path is a 404, like any unknown path."""

    def __init__(self, api: Api, store: StateStore, admin_key: str) -> None:
        self.api, self.store, self._admin_key = api, store, admin_key

    def guard(self, request: Request) -> None:
        if not admin_key_matches(self._admin_key, request.headers.get("authorization")):
            raise ApiError(
                401,
                "This route needs the admin key: 'Authorization: Bearer <MOA_ADMIN_KEY>'.",
                "invalid_request_error",
                "invalid_api_key",
            )

    def _changed(self) -> None:
        if self.api.access.auth is not None:
            self.api.access.auth.forget()

    async def create(self, request: Request) -> JSONResponse:
        self.guard(request)
        spec = self.api.parse(NewKey, await self.api.read_json(request))
        try:
            key, record = await create_key(self.store, spec)
        except KeyExists as e:
            raise ApiError(409, str(e), "invalid_request_error", "key_exists", "name") from None
        self._changed()
        # The key leaves once, in this response; nothing between here and the client keeps it.
        body = {"key": key, **key_row(record, 0)}
        return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})

    async def list_keys(self, request: Request) -> dict[str, Any]:
        self.guard(request)
        return {"object": "list", "data": await key_rows(self.store)}

    async def show(self, request: Request, name: str) -> dict[str, Any]:
        self.guard(request)
        record = await self.store.key_by_name(name)
        if record is None:
            raise ApiError(404, f"no key named {name!r}", "invalid_request_error", "key_not_found")
        return key_row(record, await spent_now(self.store, record))

    async def change(self, request: Request, name: str, verb: str) -> dict[str, Any]:
        self.guard(request)
        if verb not in VERBS:
            raise ApiError(404, f"unknown action {verb!r}", "invalid_request_error", "not_found")
        done = await change_status(self.store, name, verb)
        if done.outcome == "missing":
            raise ApiError(404, f"no key named {name!r}", "invalid_request_error", "key_not_found")
        if done.outcome == "revoked":
            raise ApiError(409, f"key {name!r} {done.reason}", "invalid_request_error", "key_revoked")
        self._changed()
        assert done.record is not None
        return key_row(done.record, await spent_now(self.store, done.record))


def admin_key_from_env() -> str | None:
    """The admin key, only ever from the environment; a short one is refused, not trusted."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip() or None
    if key is not None and len(key) < ADMIN_KEY_MIN_CHARS:
        raise ConfigError(
            f"{ADMIN_KEY_ENV} is shorter than {ADMIN_KEY_MIN_CHARS} characters: use a random one "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


# Recent FastAPI versions open their own OpenTelemetry server span per request; ours (which also
# returns x-moa-trace-id, in-process and on Ray alike) is the one server span, so theirs is off.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_api(
    config: MoAConfig,
    engine: MoAEngine,
    health: HealthFn,
    store: StateStore | None = None,
    receipts: ReceiptSource | None = None,
) -> FastAPI:
    """The API app; with a ``store``, API keys and budgets apply (once a key exists), and with
    ``MOA_ADMIN_KEY`` in the environment too, the admin API manages them (``/admin/keys``).
    ``receipts``: where the transport leaves what the calls a request cut really consumed (on
    Ray, the health board); without one, a cut call is charged its estimate."""
    api = Api(config, engine, health, store, receipts)
    # No /openapi.json, /docs or /redoc: the handlers read their bodies themselves, so the schema
    # would describe no request or response (clients follow OpenAI's API), only list the routes,
    # the admin ones included, to anyone, with or without a key.
    app = FastAPI(
        title="MoA", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None, **_NO_NATIVE_TELEMETRY
    )
    app.state.api = api
    app.add_middleware(TracingMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(MoAError)
    async def _moa(_: Request, err: MoAError) -> JSONResponse:
        return _error_response(_moa_error(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return _error_response(ApiError(422, message, "invalid_request_error", "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        api_error = ApiError(err.status_code, str(err.detail), "invalid_request_error", code)
        api_error.headers.update(err.headers or {})  # e.g. Allow on a 405
        return _error_response(api_error)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, err: ClientDisconnected) -> Response:
        # Nobody is there to read it; the status is for the request log and the span.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _error_response(ApiError(500, "internal error", "server_error", "internal_error"))

    admin_key = admin_key_from_env()
    auth = api.access.auth
    exposure = RequestExposure(
        config.server.open,
        auth.any_keys if auth is not None else None,
        describe(config.state),
        admin_api=admin_key is not None and store is not None,
    )

    async def refuse_open_to_the_network(request: Request) -> None:
        # Before the key check: with no key at all, a request from beyond loopback is refused.
        why = await exposure.refusal(request.scope.get("server"), request.scope.get("client"))
        if why is not None:
            raise ApiError(503, why, "service_unavailable", "no_api_key")

    # The API needs a key, or loopback, or server.open; /healthz (probes) and /admin (its own key,
    # which may create the first API key) do not.
    keyed = [Depends(refuse_open_to_the_network)]
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/moa", api.moa, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/models", api.models, methods=["GET", "HEAD"], dependencies=keyed)
    # {model_id:path}: a direct model's id holds a slash (openai/gpt-4.1).
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET", "HEAD"], dependencies=keyed)

    async def healthz(request: Request) -> Response:
        # Per-provider detail for the admin key only; without one set, for nobody.
        authorization = request.headers.get("authorization")
        return await api.healthz(admin_key is not None and admin_key_matches(admin_key, authorization))

    app.add_api_route("/healthz", healthz, methods=["GET", "HEAD"])
    if admin_key is not None and store is not None:
        admin = Admin(api, store, admin_key)
        app.add_api_route("/admin/keys", admin.create, methods=["POST"])
        app.add_api_route("/admin/keys", admin.list_keys, methods=["GET"])
        app.add_api_route("/admin/keys/{name}", admin.show, methods=["GET"])
        app.add_api_route("/admin/keys/{name}/{verb}", admin.change, methods=["POST"])
    return app


__all__ = ["Api", "ApiError", "InvalidRequest", "create_api", "moa_detail"]
