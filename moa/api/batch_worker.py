"""The Batch API's background work on one replica: finding batches to run, holding each one's
lease while it runs, and sending its requests through this replica's own API app, after the
interactive traffic.

Which replica runs a batch: the one that claims its lease in the state store (``claim``), and
only while it renews it (every third of ``batch.lease_s``). A replica that cannot renew stops the
batch at once (another may hold it by then); one that dies simply stops renewing, and once the
lease has passed another replica claims the batch and goes on from its journal. Every replica
looks for batches every ``batch.poll_s``; the one that accepted a batch starts at once.

Its requests go to this replica's API app in-process (an ASGI transport, no port), as the key
that created the batch: the same checks, rate limits, budget and spend ledger as the key's own
requests. They are the replica's background work, bounded and yielding: at most
``batch.concurrency`` in progress at once (all its batches together), and a request starts only
while the replica's requests in progress are fewer than ``batch.yield_at`` of its slots.

On a drain (``stop_taking``) the runs take no more requests, those in progress finish within the
drain, and the leases are let go: another replica, or this service started again, goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from moa.api.access import BATCH_KEY_SCOPE
from moa.api.admission import Admission
from moa.api.batch_files import FileStore
from moa.api.batch_job import CANCELLED, DRAINING, BatchJob
from moa.api.priority import BATCH_WORKER_SCOPE
from moa.batch.runner import BatchRunner, Reply, Stop
from moa.batch.senders import ServiceSender
from moa.config import MoAConfig
from moa.state.batches import BatchRecord, BatchStore

log = logging.getLogger("moa.api")

# How often a request waiting for the interactive traffic to ease looks again.
YIELD_POLL_S = 0.1


def lease_name(batch_id: str) -> str:
    return f"batch:{batch_id}"


class BatchGate:
    """The replica's share for batch requests: ``concurrency`` at once, each started only while
    the interactive requests in progress are fewer than ``yield_at`` of the replica's slots. The
    Batch API's requests pass it (``GatedSender``), and so do the requests a client marks as
    batch work (``x-moa-priority: batch``: ``moa batch run`` to a service) on their way in."""

    def __init__(self, admission: Admission, concurrency: int, yield_at: float) -> None:
        self.admission = admission
        self.slots = asyncio.Semaphore(concurrency)
        self.threshold = max(1, int(admission.limit * yield_at))
        self.busy = 0  # batch requests in progress (the admission counts them too)

    def _busy_elsewhere(self) -> bool:
        """Whether a batch request must wait: the interactive requests in progress have reached
        the threshold, or no slot is free at all (it would only be refused with a 429)."""
        admission = self.admission
        return admission.in_flight - self.busy >= self.threshold or admission.in_flight >= admission.limit

    async def wait_turn(self, ready: Callable[[], bool] = lambda: True) -> bool:
        """Waits for one of ``concurrency`` places, for the interactive load to ease and for
        ``ready`` (the request's key has room: a patient request waits rather than be refused),
        and takes the turn (``end_turn`` gives it back); False, with nothing taken, once the
        replica drains."""
        await self.slots.acquire()
        try:
            # The admission keeps counts, not an event per change: looked at every YIELD_POLL_S.
            while (self._busy_elsewhere() or not ready()) and not self.admission.draining:  # noqa: ASYNC110
                await asyncio.sleep(YIELD_POLL_S)
        except BaseException:
            self.slots.release()
            raise
        if self.admission.draining:
            self.slots.release()
            return False
        self.busy += 1
        return True

    def end_turn(self) -> None:
        self.busy -= 1
        self.slots.release()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if not await self.wait_turn():
            # Not sent, not written: the request runs with the batch's next run.
            raise Stop(DRAINING)
        try:
            yield
        finally:
            self.end_turn()


class GatedSender:
    """A batch's requests through the gate, to the app as the batch's key."""

    def __init__(self, inner: ServiceSender, gate: BatchGate) -> None:
        self.inner, self.gate = inner, gate

    async def send(self, url: str, body: dict[str, Any]) -> Reply:
        async with self.gate.turn():
            return await self.inner.send(url, body)


def as_key(app: Any, key_hash: str | None) -> Any:
    """The API app, every request it gets marked as the Batch API's (``BATCH_WORKER_SCOPE``:
    background work, already through the gate) and as sent by the key whose hash is ``key_hash``
    (``moa.api.access.BATCH_KEY_SCOPE``): marks in the ASGI scope, which no HTTP client can set.
    None (the service ran open when the batch was created): no key mark, as an open request."""

    async def app_as_key(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = scope | {BATCH_WORKER_SCOPE: True}
        if key_hash is not None:
            scope = scope | {BATCH_KEY_SCOPE: key_hash}
        await app(scope, receive, send)

    return app_as_key


class BatchWorker:
    def __init__(
        self,
        config: MoAConfig,
        store: BatchStore,
        files: FileStore,
        app: Any,
        gate: BatchGate,
        background: bool = True,
    ) -> None:
        self.config, self.store, self.files, self.app = config, store, files, app
        # False: this app runs no batch (one command's own app): it never looks for any.
        self.background = background
        self.batch = config.batch
        self.gate = gate  # the replica's, shared with the requests clients mark as batch work
        # This replica, as the holder of its leases (unique even for two replicas in one process).
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.runners: dict[str, BatchRunner] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Starts looking for batches (on the running loop: the one that serves the app)."""
        if self.background and self._loop is None and not self._stopping:
            self._loop = asyncio.get_running_loop().create_task(self._look())

    def wake(self) -> None:
        """A batch was created, or cancelled, here: look now rather than at the next poll."""
        self.start()
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """The batch was cancelled: if it runs here, it takes no more requests (those in progress
        finish and are written), and is finalized as cancelled."""
        runner = self.runners.get(batch_id)
        if runner is not None:
            runner.stop(CANCELLED)
        self.wake()

    def stop_taking(self) -> None:
        """The service drains: no batch is taken any more, and those running take no more
        requests (those in progress finish within the drain)."""
        self._stopping = True
        for runner in self.runners.values():
            runner.stop(DRAINING)
        self._wake.set()

    async def close(self, grace_s: float = 0.0) -> None:
        """Ends the batch work: the runs, told to stop, get ``grace_s`` to end on their own (an
        answer that came in is written before its run ends: cut then, it would be paid again);
        whatever still runs after it is ended (a request cut so runs again with the batch's next
        run). Their leases are let go."""
        self.stop_taking()
        runs = list(self.running.values())
        if runs and grace_s > 0:
            await asyncio.wait(runs, timeout=grace_s)
        tasks = [t for t in (self._loop, *runs) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- finding batches ------------------------------------------------------------------------

    async def _look(self) -> None:
        while not self._stopping:
            try:
                await self._take()
            except Exception:  # the store may be briefly unreachable: the next look will do
                log.warning("could not look for batches to run", exc_info=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _take(self) -> None:
        for batch_id in await self.store.open_batches():
            if self._stopping or len(self.running) >= self.batch.max_running:
                return
            if batch_id in self.running:
                continue
            if await self.store.claim(lease_name(batch_id), self.holder, self.batch.lease_s):
                task = asyncio.get_running_loop().create_task(self._hold(batch_id))
                self.running[batch_id] = task
                task.add_done_callback(functools.partial(self._ended, batch_id))

    def _ended(self, batch_id: str, _: object = None) -> None:
        self.running.pop(batch_id, None)
        self.runners.pop(batch_id, None)
        if not self._stopping:
            self._wake.set()  # a place is free: another batch may wait for it

    # -- running one ----------------------------------------------------------------------------

    async def _hold(self, batch_id: str) -> None:
        """Runs the batch while its lease is held; lets the lease go when it ends."""
        run = asyncio.ensure_future(self._run(batch_id))
        keeper = asyncio.ensure_future(self._keep(batch_id, run))
        try:
            await asyncio.wait({run})
            if not run.cancelled() and run.exception() is not None:
                log.error(
                    "batch %s stopped on an error; it runs again from its journal",
                    batch_id,
                    exc_info=run.exception(),
                )
        finally:
            run.cancel()
            keeper.cancel()
            await asyncio.gather(run, keeper, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(lease_name(batch_id), self.holder))

    async def _run(self, batch_id: str) -> None:
        record = await self.store.batch(batch_id)
        if record is None:
            return
        async with self._client(record) as client:
            sender = GatedSender(ServiceSender(client), self.gate)

            def started(runner: BatchRunner) -> None:
                self.runners[batch_id] = runner
                if self._stopping:
                    runner.stop(DRAINING)

            job = BatchJob(batch_id, self.config, self.store, self.files, sender, started)
            await job.run()

    @contextlib.asynccontextmanager
    async def _client(self, record: BatchRecord) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=as_key(self.app, record.owner_hash))
        # A loopback client, as the API sees it: this is the service's own work.
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", timeout=None
        ) as client:
            yield client

    async def _keep(self, batch_id: str, run: asyncio.Future[None]) -> None:
        """Renews the lease every third of ``lease_s`` (and looks for a cancellation every
        ``poll_s``); stops the run as soon as the lease may be another's."""
        every = min(self.batch.lease_s / 3, self.batch.poll_s)
        renewed = time.monotonic()
        while not run.done():
            await asyncio.sleep(every)
            try:
                held = await self.store.claim(lease_name(batch_id), self.holder, self.batch.lease_s)
                record = await self.store.batch(batch_id)
            except Exception:
                if time.monotonic() - renewed < self.batch.lease_s - every:
                    continue  # the store may be back before the lease passes
                held, record = False, None
            if not held:
                log.warning("lost the lease of batch %s: stopping it here", batch_id)
                run.cancel()
                return
            renewed = time.monotonic()
            if record is not None and record.status == "cancelling":
                self.cancel(batch_id)
