"""Running a batch: its items through the service's own API, a few at a time, within a budget.

Each item is sent to the API exactly as a client would send it (in-process through the ASGI app,
or to a running service over HTTP: ``moa.batch.senders``), so its output line holds the response
the API gives, with the same checks, caps, keys, budgets, cache and traces as any request.

The budget (``max_cost_usd``) holds before the money is spent, not after: every item is sent with
a cost cap (``moa.max_cost_usd``), its share of what the budget has left once the items in flight
hold theirs, and the API refuses, before any model is called, a request whose worst case exceeds
its cap. An item refused for its share waits for an item in flight to finish and free its share;
when nothing is in flight and it is still refused, the budget cannot hold it and the batch stops,
keeping what is done. So a batch never spends more than its budget, counting what earlier runs of
the same output spent (the service's own estimate error aside: docs/RELIABILITY.md).

Retries: a 408, 429 or 5xx, or no response at all, is tried again (after the service's Retry-After,
else an exponential backoff) up to ``attempts`` times, then written with its last error. A 401
stops the batch (every item would get it). Any other answer, error or not, is the item's outcome.
Items with the same request (endpoint and body) are sent once; the answer is written for each id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, Field

from moa.batch.items import BatchItem
from moa.batch.journal import Journal, Outcome

RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
COST_HEADER = "x-moa-cost-usd"


@dataclass(frozen=True)
class Reply:
    """The API's answer to one request."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


class SendFailed(Exception):
    """No response came (connection refused or lost, a timeout): ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Sender(Protocol):
    """Where a batch sends its requests (``moa.batch.senders``)."""

    async def send(self, url: str, body: dict[str, Any]) -> Reply:
        """POST ``body`` to ``url``; raises ``SendFailed`` when no response came."""
        ...


class BatchSummary(BaseModel):
    """What a run of the batch did (the output file holds each item)."""

    total: int = Field(description="Items in the input.")
    done: int = Field(description="Items with an output line, from this run and earlier ones.")
    succeeded: int = Field(description="Done items the API answered with 200.")
    errors: dict[str, int] = Field(description="Done items that did not succeed, by error code.")
    cost_usd: float = Field(description="What the done items cost, earlier runs included.")
    run_cost_usd: float = Field(description="What this run's items cost.")
    seconds: float = Field(description="How long this run took.")
    stopped: str | None = Field(description="Why the run stopped before every item was done, if it did.")


@dataclass
class Progress:
    """Told after every item: enough for a progress bar and the status file."""

    total: int
    done: int
    cost_usd: float
    errors: int


def _usage_tokens(body: Any) -> int:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    if "total_tokens" in usage:
        return int(usage["total_tokens"])
    return int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))


def _reply_cost(reply: Reply) -> float:
    """The request's cost, as the service reports it: the ``x-moa-cost-usd`` header, else the
    ``/v1/moa`` body's own ``cost_usd``."""
    if COST_HEADER in reply.headers:
        return float(reply.headers[COST_HEADER])
    if isinstance(reply.body, dict) and isinstance(reply.body.get("cost_usd"), int | float):
        return float(reply.body["cost_usd"])
    return 0.0


def _refused_for_cap(reply: Reply) -> bool:
    err = reply.body.get("error") if isinstance(reply.body, dict) else None
    return (
        reply.status == 400
        and isinstance(err, dict)
        and err.get("code") == "over_cap"
        and str(err.get("param", "")).endswith("max_cost_usd")
    )


def _own_cap(item: BatchItem) -> float | None:
    """The cost cap the item's own body sets, if any."""
    if item.url == "/v1/moa":
        cap = item.body.get("max_cost_usd")
    else:
        moa = item.body.get("moa")
        cap = moa.get("max_cost_usd") if isinstance(moa, dict) else None
    return float(cap) if isinstance(cap, int | float) else None


def _with_cap(item: BatchItem, cap: float) -> dict[str, Any]:
    body = dict(item.body)
    if item.url == "/v1/moa":
        body["max_cost_usd"] = cap
    else:
        body["moa"] = dict(body.get("moa") or {}) | {"max_cost_usd": cap}
    return body


class Stop(Exception):
    """The batch stops taking items; the message says why. A sender may raise it too: the item
    it was sending is then not written (it runs again with the batch's next run)."""


class BatchRunner:
    """Runs the items of a batch not yet in its journal."""

    def __init__(
        self,
        items: list[BatchItem],
        journal: Journal,
        sender: Sender,
        *,
        concurrency: int = 4,
        max_cost_usd: float | None = None,
        attempts: int = 4,
        backoff_s: float = 1.0,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.items, self.journal, self.sender = items, journal, sender
        self.concurrency, self.max_cost_usd = concurrency, max_cost_usd
        self.attempts, self.backoff_s = attempts, backoff_s
        self.on_progress = on_progress
        self.sleep: Callable[[float], Any] = asyncio.sleep
        self.spent = sum(o.cost_usd for o in journal.done.values())
        self._failed = sum(not o.ok for o in journal.done.values())
        self.run_spent = 0.0
        self._held: dict[int, float] = {}  # worker -> the cost cap its item in flight holds
        self._freed = asyncio.Event()  # set (and replaced) whenever an item's hold is let go
        self._queue: asyncio.Queue[list[BatchItem]] = asyncio.Queue()
        self._stopped: str | None = None

    def stop(self, why: str) -> None:
        """Take no more items: those in flight finish and are written, then ``run`` returns,
        its summary's ``stopped`` saying ``why``. The Batch API stops a batch so when it is
        cancelled, or its service drains (the rest runs later, from the journal)."""
        self._stopped = self._stopped or why

    # -- the budget ------------------------------------------------------------------------------

    def _others(self, worker: int) -> float:
        """What the items other workers have in flight hold of the budget."""
        return sum(c for w, c in self._held.items() if w != worker)

    def _share(self, worker: int, whole: bool) -> float | None:
        """What this worker's next item may cost at most: the budget's remainder, less what the
        items in flight hold, split between this item and the items that may start beside it
        (or all of it: ``whole``)."""
        if self.max_cost_usd is None:
            return None
        free = max(0.0, self.max_cost_usd - self.spent - self._others(worker))
        if whole:
            return free
        busy = sum(1 for w in self._held if w != worker)
        return free / max(1, min(self.concurrency - busy, 1 + self._queue.qsize()))

    async def _freed_one(self, worker: int) -> None:
        """This worker's item is done (or refused): its hold goes back to the budget."""
        self._held.pop(worker, None)
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()

    async def _send_once(self, item: BatchItem, worker: int) -> Reply:
        """The item's request within its share of the budget. Refused for its share, it waits
        for an item in flight to free some and tries again; with nothing in flight, it asks for
        all the budget has left once, and if even that is refused, the batch stops."""
        own = _own_cap(item)
        whole = False
        while True:
            share = self._share(worker, whole)
            if share is None:
                return await self.sender.send(item.url, item.body)
            cap = share if own is None else min(own, share)
            if cap > 0:
                self._held[worker] = cap
                reply = await self.sender.send(item.url, _with_cap(item, cap))
                if not (_refused_for_cap(reply) and (own is None or cap < own)):
                    return reply
                await self._freed_one(worker)
            if any(w != worker for w in self._held):
                await self._freed.wait()
                whole = False
            elif not whole:
                whole = True
            else:
                spent = f"${self.spent:.6f} spent"
                raise Stop(f"the budget (${self.max_cost_usd:g}, {spent}) cannot hold another item")

    async def _outcome(self, item: BatchItem, worker: int) -> Outcome:
        t0 = time.monotonic()
        last: Reply | SendFailed | None = None
        for attempt in range(self.attempts):
            if attempt:
                await self.sleep(self._backoff(attempt, last))
            try:
                last = await self._send_once(item, worker)
            except SendFailed as e:
                last = e
                continue
            if last.status == 401:
                raise Stop(f"the service refused the API key (401): {last.body}")
            if last.status not in RETRIED_STATUSES:
                break
        seconds = time.monotonic() - t0
        if isinstance(last, SendFailed):
            return Outcome(
                custom_id=item.custom_id,
                status_code=None,
                error={"code": last.code, "message": str(last)},
                seconds=seconds,
            )
        assert last is not None
        return Outcome(
            custom_id=item.custom_id,
            status_code=last.status,
            body=last.body,
            request_id=last.headers.get("x-moa-trace-id"),
            cost_usd=_reply_cost(last),
            tokens=_usage_tokens(last.body),
            seconds=seconds,
        )

    def _backoff(self, attempt: int, last: Reply | SendFailed | None) -> float:
        if isinstance(last, Reply) and "retry-after" in last.headers:
            try:
                return min(MAX_BACKOFF_S, max(0.0, float(last.headers["retry-after"])))
            except ValueError:
                pass
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))

    # -- the run ---------------------------------------------------------------------------------

    def _finish(self, outcome: Outcome, copies: list[BatchItem]) -> None:
        self.spent += outcome.cost_usd
        self.run_spent += outcome.cost_usd
        self.journal.write(outcome)
        for other in copies:  # the same request under other ids: written, not paid again
            self.journal.write(
                outcome.model_copy(update={"custom_id": other.custom_id, "cost_usd": 0.0, "tokens": 0})
            )
        self._failed += (1 + len(copies)) * (not outcome.ok)
        if self.on_progress is not None:
            self.on_progress(Progress(len(self.items), len(self.journal.done), self.spent, self._failed))

    def _groups(self) -> list[list[BatchItem]]:
        """The items still to do, the same requests grouped (the first of each is sent); an item
        whose request an earlier run answered gets that answer now."""
        answered = {i.fingerprint(): i.custom_id for i in self.items if i.custom_id in self.journal.done}
        groups: dict[str, list[BatchItem]] = {}
        for item in self.items:
            if item.custom_id in self.journal.done:
                continue
            fp = item.fingerprint()
            if fp in answered:
                self._finish_copy(item, answered[fp])
            else:
                groups.setdefault(fp, []).append(item)
        return list(groups.values())

    def _finish_copy(self, item: BatchItem, of: str) -> None:
        copy = {"custom_id": item.custom_id, "cost_usd": 0.0, "tokens": 0}
        outcome = self.journal.full(of).model_copy(update=copy)
        self._failed += not outcome.ok
        self.journal.write(outcome)

    async def _worker(self, worker: int) -> None:
        while self._stopped is None:
            try:
                group = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                outcome = await self._outcome(group[0], worker)
            except Stop as e:
                self._stopped = self._stopped or str(e)
                await self._freed_one(worker)
                return
            self._finish(outcome, group[1:])
            await self._freed_one(worker)

    async def run(self) -> BatchSummary:
        """Runs every item not yet done; returns when all are, or the batch had to stop."""
        t0 = time.monotonic()
        for group in self._groups():
            self._queue.put_nowait(group)
        async with asyncio.TaskGroup() as workers:  # one failing cancels the others
            for w in range(self.concurrency):
                workers.create_task(self._worker(w))
        return self.summary(time.monotonic() - t0)

    def summary(self, seconds: float) -> BatchSummary:
        outcomes = [self.journal.done[i.custom_id] for i in self.items if i.custom_id in self.journal.done]
        errors: dict[str, int] = {}
        for o in outcomes:
            if not o.ok:
                errors[o.kind] = errors.get(o.kind, 0) + 1
        return BatchSummary(
            total=len(self.items),
            done=len(outcomes),
            succeeded=sum(o.ok for o in outcomes),
            errors=errors,
            cost_usd=round(self.spent, 6),
            run_cost_usd=round(self.run_spent, 6),
            seconds=round(seconds, 3),
            stopped=self._stopped,
        )
