"""Ending a request's work when nobody will take its answer: the one place that watches for the
client hanging up, the drain running out and the deadline's backstop, and the one way a run (or
a stream's event pump) is cancelled and waited for.

A stream's response, once its headers went out, is ended by Starlette when its client leaves;
``AdmittedStream`` then closes its events with ``ended``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from moa.api.errors import ClientDisconnected
from moa.deadline import Deadline
from moa.errors import DeadlineExceeded, ShuttingDown

T = TypeVar("T")

# The engine ends a request at its deadline itself; past the deadline plus this, the API stops
# waiting whatever the engine's transports do (a handle call to a deployment with no replica).
BACKSTOP_GRACE_S = 2.0
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


async def until_done(
    request: Request, work: Awaitable[T], deadline: Deadline, cut: asyncio.Future[None]
) -> T:
    """Await ``work``, cancelling it (and with it the whole fan-out) if the client goes away
    (``ClientDisconnected``), a drain runs out (``ShuttingDown``) or the request's deadline
    passed well beyond what the engine allows itself (``DeadlineExceeded``). ``cut`` is resolved
    when a drain runs out."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request))
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


async def disconnected(request: Request) -> None:
    """Returns once the client hung up (read from the request's ASGI messages)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
