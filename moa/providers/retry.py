"""The retry loop inside one call's deadline: retryable failures go again after a jittered
backoff (or the wait the provider asked for), a parameter the model refuses is dropped and the
call goes again at once, and a stream is never retried once text has been sent."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from moa.config import RetryConfig
from moa.deadline import Deadline
from moa.providers.call import Call
from moa.providers.transport import Attempt, AttemptError, RefusalFragment, ToolFragment
from moa.types import CallRequest, ErrorKind, StreamEvent, TextDelta


def retry_delay(
    retry: RetryConfig, err: AttemptError, attempts: int, deadline: Deadline, emitted: bool
) -> float | None:
    """How long to wait before the next attempt, or None to give up now. (Five parameters: the
    policy, the failure, and the three facts of the call that decide.)"""
    if emitted or not err.kind.retryable or attempts >= retry.max_attempts:
        return None
    if err.retry_after_s is not None:
        if err.retry_after_s > retry.max_retry_after_s:
            return None
        delay = err.retry_after_s
    else:
        cap = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (attempts - 1))
        delay = random.uniform(0, cap)
    if delay >= deadline.remaining():
        return None
    return delay


async def attempts(call: Call) -> AsyncGenerator[StreamEvent, None]:
    """Attempts until one answers or the failure is final; streamed text as it comes, then the
    one ``CallResult``."""
    refusals = call.client.refusals
    sent, call.adjustments = refusals.prepare(call.req)
    while True:
        call.attempts += 1
        final: Attempt | None = None
        try:
            # Closed with this loop: a consumer that stops at a yield closes the provider's stream now.
            async with contextlib.aclosing(_attempt(call, sent)) as items:
                async for item in items:
                    if isinstance(item, Attempt):
                        final = item
                    else:
                        yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = _typed(call, exc)
            if not call.used.generated and refusals.learn(sent, err):
                call.relearned += 1
                sent, call.adjustments = refusals.prepare(call.req)
                continue
            emitted = call.used.generated
            delay = retry_delay(
                call.client.cfg.retry, err, call.attempts - call.relearned, call.deadline, emitted
            )
            if delay is None:
                yield call.given_up(err)
                return
            await asyncio.sleep(delay)
            continue
        assert final is not None  # _attempt ends with its Attempt or raises
        yield call.answered(final)
        return


def _typed(call: Call, exc: Exception) -> AttemptError:
    """The failure typed, and counted: refused with a status (nothing generated), or never sent."""
    err = exc if isinstance(exc, AttemptError) else call.client.transport.classify(exc, in_stream=call.stream)
    if err.status is not None or err.kind is ErrorKind.INTERNAL or err.unsent:
        call.used.refused += 1
    call.add_service(err.service_s)
    return err


def _attempt(call: Call, sent: CallRequest) -> AsyncGenerator[TextDelta | Attempt, None]:
    """One attempt within the call's deadline: its text pieces (streamed), then its Attempt."""
    remaining = call.deadline.remaining()
    if call.deadline.expired:
        raise AttemptError(ErrorKind.TIMEOUT, "the call's deadline passed")
    call.used.sent += 1  # from here the provider may have read (and billed) the prompt
    return _streamed(call, sent, remaining) if call.stream else _sent(call, sent, remaining)


async def _sent(call: Call, sent: CallRequest, timeout_s: float) -> AsyncGenerator[Attempt, None]:
    """One plain attempt, bounded by the call's deadline."""
    async with asyncio.timeout_at(call.deadline.loop_time()):
        final = await call.client.transport.send(sent, timeout_s)
    yield final


async def _streamed(
    call: Call, sent: CallRequest, timeout_s: float
) -> AsyncGenerator[TextDelta | Attempt, None]:
    """One streamed attempt; each wait for the next piece bounded by the call's deadline."""
    it = aiter(call.client.transport.open_stream(sent, timeout_s))
    final: Attempt | None = None
    try:
        while True:
            async with asyncio.timeout_at(call.deadline.loop_time()):
                item = await anext(it, None)
            if item is None:
                break
            if isinstance(item, Attempt):
                final = item
            elif isinstance(item, ToolFragment | RefusalFragment):
                call.generated(item.text)
            elif item:
                call.received(item)
                yield TextDelta(text=item)
    finally:
        await _aclose(it)
    if final is None:
        raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "stream ended without its final event")
    yield final


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


__all__ = ["attempts", "retry_delay"]
