"""The retry loop inside one call's deadline: retryable failures go again after a jittered
backoff (or the wait the provider asked for), a parameter the model refuses is dropped and the
call goes again at once, and a stream is never retried once text has been sent."""

from __future__ import annotations

import asyncio
import contextlib
import math
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
    deadline = _PieceDeadline(call.deadline.loop_time())
    try:
        while True:
            item = await deadline.next(it)
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
        deadline.close()
        await _aclose(it)
    if final is None:
        raise AttemptError(ErrorKind.MALFORMED_RESPONSE, "stream ended without its final event")
    yield final


class _PieceDeadline:
    """The call's deadline over each wait for a stream's next piece, as ``asyncio.timeout_at``
    around each wait would bound it, with one timer for the whole stream: a timer armed and
    cancelled for every piece was 4% of the in-process server's CPU samples (docs/BENCHMARKS.md),
    4 µs a piece against under 1 here. The same rule: a wait under way when the deadline passes is
    cancelled and raises ``TimeoutError``; a wait begun after it is cancelled at its first
    suspension (a piece already at hand is still read); a cancellation from elsewhere stays one."""

    def __init__(self, when: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._when = math.inf if when is None else when  # None: no deadline, no timer
        self._passed = False
        self._waiting: asyncio.Task[Any] | None = None  # the task waiting for a piece, if one is
        self._fired = False  # the deadline cancelled the wait under way
        self._timer = None if when is None else self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._passed = True
        task = self._waiting
        if task is not None and not self._fired:
            self._fired = True
            task.cancel()

    async def next(self, it: AsyncIterator[Any]) -> Any:
        """The next item of ``it`` (None at its end), within the deadline."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._waiting, self._fired = task, False
        if self._passed or self._loop.time() >= self._when:
            self._loop.call_soon(self._expire)  # as asyncio.timeout_at does with a past deadline
        try:
            item = await anext(it, None)
        except asyncio.CancelledError as exc:
            if self._fired and task.uncancel() <= cancelling:
                raise TimeoutError from exc
            raise
        finally:
            self._waiting = None
        if self._fired:  # the deadline's cancel came as the piece did: withdrawn, as timeout_at does
            task.uncancel()
        return item

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


__all__ = ["attempts", "retry_delay"]
