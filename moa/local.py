"""``moa serve --local``: the same HTTP API from one process, without Ray.

The engine calls the providers through the in-process provider pool (one SDK client, concurrency
semaphore, rate budget and circuit breaker per provider); the API, its limits, errors, logs and
traces are the ones the Ray ingress serves. For development, laptops and small single-node
deployments; the test suite uses it wherever Ray adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from moa.api.app import CUT_GRACE_S, Api, create_api
from moa.config import MoAConfig
from moa.engine.assembly import assemble
from moa.engine.receipts import Receipts
from moa.providers.registry import ProviderPool
from moa.service import StopSignals, banner, claim_port, draining_message
from moa.state import StateStore, open_store


@contextlib.asynccontextmanager
async def local_app(
    cfg: MoAConfig, store: Callable[[], StateStore] | None = None, run_batches: bool = True
) -> AsyncIterator[FastAPI]:
    """The API app over the in-process provider pool; the pool's clients close on exit. With a
    ``store`` (built here, on the server's own loop), API keys and budgets apply, and the Batch
    API's batches run in its background unless ``run_batches`` is False."""
    # What a call cut mid-stream really consumed, as its client saw it (tool-call fragments
    # included): the ledger charges the larger of that and the engine's estimate.
    receipts = Receipts()
    async with ProviderPool.from_config(cfg, sim_url=cfg.simulator.url, receipts=receipts) as pool:
        engine = assemble(cfg, pool)

        async def health() -> dict[str, Any]:
            return pool.health()

        app = create_api(cfg, engine, health, store() if store else None, receipts, run_batches=run_batches)
        try:
            yield app
        finally:
            await app.state.api.close()  # the Batch API's background work, if any is left


# Bytes a request line and its headers may take (uvicorn's h11 default for an incomplete event).
MAX_HEAD_BYTES = 64 * 1024


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on reading a request's head, which uvicorn lacks:
    its keep-alive timer runs only between requests and stops at the first byte, so a client that
    connects and sends nothing, or half a request line, held its connection (and a file
    descriptor) for ever; enough of them exhaust the server. From the moment the connection opens
    or a new request begins, its line and headers must arrive within ``head_timeout_s``, or the
    connection is closed; and they may not exceed ``MAX_HEAD_BYTES`` (a 400, then closed). The
    body is the app's to bound (``server.max_request_bytes``, the request deadline)."""

    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._reading_head = True
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._reading_head and not self.transport.is_closing():
            self.transport.close()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raised inside the parser's callback: uvicorn answers 400 and closes the connection.
            raise ValueError("request line and headers too large")

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_head:  # the next request on a kept-alive connection
            self._reading_head, self._head_bytes = True, 0
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # Idle between requests: uvicorn's keep-alive timer bounds it; the head timer starts
        # again with the next request's first byte (on_message_begin).
        self._reading_head, self._head_bytes = True, 0
        self._disarm_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def head_timeout_protocol(head_timeout_s: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for uvicorn's ``http`` option, with this server's bound."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": head_timeout_s})


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    # Signals are ours (StopSignals): uvicorn's own handling would stop without draining.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LocalServer:
    """The API on a socket already claimed (``claim_port``), served by uvicorn in this process.

    ``stop()`` (from any thread, or a signal handler) drains: new requests get 503, those in
    progress get ``server.drain_s`` to finish, then unfinished ones are ended; then the server
    exits. A second ``stop()`` ends them at once.
    """

    def __init__(
        self, cfg: MoAConfig, sock: socket.socket, store: Callable[[], StateStore] | None = None
    ) -> None:
        self.cfg = cfg
        self.sock = sock
        self.store = store
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        self.api: Api | None = None
        self.cut: int | None = None  # requests the drain had to end, once it ran
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stops = 0

    async def run(self, on_ready: Callable[[str], None] | None = None) -> int:
        """Serve until stopped; returns how many requests the drain had to end."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with local_app(self.cfg, self.store) as app:
            self.api = app.state.api
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                # Slow clients: a request's head must arrive within server.header_timeout_s, and an
                # idle kept-alive connection closes after server.keep_alive_s.
                http=head_timeout_protocol(self.cfg.server.header_timeout_s),
                timeout_keep_alive=self.cfg.server.keep_alive_s,
                # The drain has ended every request by then; this bounds idle keep-alive closing.
                timeout_graceful_shutdown=int(CUT_GRACE_S) + 1,
            )
            server = _Uvicorn(config)
            serving = asyncio.create_task(server.serve(sockets=[self.sock]))
            ready = asyncio.create_task(server.ready.wait())
            await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if serving.done():
                await serving  # start-up failed: raise why
            if self._stops:  # stopped while starting
                self._stop.set()
            if on_ready is not None and not self._stop.is_set():
                on_ready(self.url)
            await self._stop.wait()
            self.cut = await self.api.drain(self.cfg.server.drain_s)
            server.should_exit = True
            await serving
        return self.cut

    def stop(self) -> None:
        """Ask for a graceful stop (the second call: hurry). Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stops += 1
            return
        loop.call_soon_threadsafe(self._on_stop)

    def _on_stop(self) -> None:
        self._stops += 1
        if self._stops > 1 and self.api is not None:
            self.api.hurry()
        if self._stop is not None:
            self._stop.set()


def serve_in_process(
    cfg: MoAConfig,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    keys_required: bool | None = None,
) -> int:
    """``moa serve --local``: serve until SIGINT or SIGTERM, drain, exit. Returns the exit status.

    ``keys_required``: whether an API key exists (the banner's examples send one then); None asks
    the state store."""
    import os

    from moa.exposure import keys_exist
    from moa.simulator.server import simulator_if_needed
    from moa_observability.logs import configure_json_logging
    from moa_observability.tracing import flush_tracing, setup_tracing

    sock = sock or claim_port(host, port)
    keys = keys_exist(cfg.state) if keys_required is None else keys_required
    # As a Ray replica does (actors/telemetry.py): traces when an OTLP endpoint is set, JSON logs.
    setup_tracing({"service.instance.id": f"{socket.gethostname()}:{os.getpid()}", "moa.mode": "local"})
    if cfg.observability.json_logs:
        configure_json_logging()
    with simulator_if_needed(cfg, announce=False) as cfg_:
        # Keys and the spend ledger, as the Ray ingress keeps them (state in the config).
        server = LocalServer(cfg_, sock, lambda: open_store(cfg_.state))

        def ready(url: str) -> None:
            # The config as given (cfg): cfg_ names the simulator just started, which would hide
            # from the banner that the answers are synthetic.
            lines = banner(cfg, url, mode="local: one process, no Ray", keys_required=keys)
            print("\n".join(lines), flush=True)

        def stop() -> None:
            print(draining_message(cfg_), file=sys.stderr, flush=True)
            server.stop()

        async def main() -> int:
            signals = StopSignals(stop, server.stop)
            signals.install_in_loop()
            return await server.run(on_ready=ready)

        try:
            cut = asyncio.run(main())
        finally:
            flush_tracing()
    print(
        f"Stopped{f' ({cut} request(s) still running were ended)' if cut else ''}.",
        file=sys.stderr,
        flush=True,
    )
    return 0
