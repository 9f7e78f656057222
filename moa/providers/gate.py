"""What a call passes before its attempts, and what the provider's limits learn after: a key, a
circuit that lets it through, a concurrency slot and a rate budget reservation within its
deadline (a background call's only above the interactive reserve); then the reservation settled
with what it really used, the slot freed, and the breaker told whether the outcome was the
provider's fault."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from enum import Enum

from moa.limits import DEFAULT_OUTPUT_RESERVE, CircuitBreaker, RateBudgetExceeded
from moa.providers.call import Call
from moa.providers.retry import attempts
from moa.providers.transport import AttemptError
from moa.types import CallResult, ErrorKind, StreamEvent


class Verdict(Enum):
    """What one call's outcome tells the breaker about the provider's health."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # cancelled, refused on our side, a bad request, the caller's own deadline

    def record(self, breaker: CircuitBreaker) -> None:
        if self is Verdict.SUCCESS:
            breaker.record_success()
        elif self is Verdict.FAILURE:
            breaker.record_failure()
        else:
            breaker.record_neutral()


def verdict(error: ErrorKind | None, caller_budget: bool) -> Verdict:
    """Only failures of the provider count against it; a timeout counts only when the deadline was
    the provider's own timeout, not a tighter budget of the caller's (``Call.caller_budget``)."""
    if error is None:
        return Verdict.SUCCESS
    if error.counts_against_health and not (error is ErrorKind.TIMEOUT and caller_budget):
        return Verdict.FAILURE
    return Verdict.NEUTRAL


def reservation(call: Call) -> int:
    """The tokens a call may consume: its prompt, and never more output than the model can
    produce in one answer."""
    max_output = call.client.cfg.price(call.req.model).max_output_tokens
    wanted_output = min(call.req.params.max_tokens or DEFAULT_OUTPUT_RESERVE, max_output)
    return call.used.input_tokens + wanted_output


def refused_at_the_door(call: Call) -> CallResult | None:
    """The failure of a call that never reaches a slot: no key, or the circuit open."""
    client = call.client
    if client.endpoint.api_key is None and client.cfg.api_key_env:
        why = f"no API key: set the {client.cfg.api_key_env} environment variable"
        return call.failure(AttemptError(ErrorKind.AUTH, why))
    breaker = client.limits.breaker
    if not breaker.allow():
        wait = breaker.retry_after_s()
        why = f"circuit open after repeated failures; retry in {wait:.1f}s"
        return call.failure(
            AttemptError(ErrorKind.CIRCUIT_OPEN, why, retry_after_s=wait), streamed=call.stream
        )
    return None


async def gated(call: Call) -> AsyncGenerator[StreamEvent, None]:
    """The call's attempts inside its slot and its budget reservation; the breaker learns the outcome."""
    refused = refused_at_the_door(call)
    if refused is not None:
        yield refused
        return
    limits = call.client.limits
    background = call.req.background  # a batch's call: it leaves the interactive reserve alone
    if not await limits.enter(call.deadline.remaining(), background):
        limits.breaker.record_neutral()
        why = "no concurrency slot came free before the deadline"
        yield call.failure(AttemptError(ErrorKind.TIMEOUT, why), streamed=call.stream)
        return
    outcome = Verdict.NEUTRAL  # until a result says otherwise: a call cancelled says nothing
    reserved = 0
    try:
        reserved = reservation(call)  # held from here: a wait cancelled mid-way is settled too
        try:
            await limits.budget.acquire(reserved, call.deadline.remaining(), background)
        except RateBudgetExceeded as e:
            reserved = 0  # nothing was taken
            why = f"rate budget of this provider exhausted; retry in {e.retry_after_s:.1f}s"
            err = AttemptError(ErrorKind.RATE_LIMITED, why, retry_after_s=e.retry_after_s)
            yield call.failure(err, streamed=call.stream)
            return
        async with contextlib.aclosing(attempts(call)) as events:
            async for ev in events:
                if isinstance(ev, CallResult):
                    outcome = verdict(ev.error.kind if ev.error else None, call.caller_budget)
                    if ev.ok:
                        call.used.actual = ev.usage.total_tokens
                yield ev
    finally:
        if reserved:
            # Settle with what the call really used, however it ended: its usage when it
            # answered; nothing when every attempt was refused before any token; what was
            # sent and received so far when it failed or was cancelled mid-way.
            await limits.budget.settle(reserved, call.used.tokens())
        limits.leave()
        outcome.record(limits.breaker)
