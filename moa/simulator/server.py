"""Running the simulator: on uvicorn in a background thread (tests, in-process CLI) or in the foreground;
and the one a command starts for itself when calls go to the simulator and none runs
(``simulator_if_needed``).

The background server binds its socket before starting, so ``port=0`` gets a free port whose
number is known at once; ``start()`` returns only when the server accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import uvicorn

from moa.config import MoAConfig, simulation_active
from moa.simulator.app import SimulatorApp, create_app
from moa.simulator.profile import SimProfile, load_profile

_HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
_HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
# Clients pool connections: closing idle ones early makes aiohttp (the Gemini SDK's async
# transport) hit stale connections, which it then retries only after a long pause.
_KEEP_ALIVE_S = 75


def _new_loop() -> asyncio.AbstractEventLoop:
    if _HAS_UVLOOP:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _bind(host: str, port: int) -> socket.socket:
    """The simulator's socket, named TCP (``IPPROTO_TCP``) as ``moa.service.claim_port`` names
    its own: asyncio's loop (where uvloop is not installed) turns Nagle's algorithm off only on
    sockets that say they are TCP, and each answer would otherwise wait 40 ms for its client's
    delayed acknowledgement."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _config(app: SimulatorApp, *, quiet_logging: bool) -> uvicorn.Config:
    kwargs: dict[str, Any] = {}
    if quiet_logging:
        kwargs["log_config"] = None  # leave the host process's logging configuration alone
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # the request path is a benchmark hot path
        lifespan="off",
        http="httptools" if _HAS_HTTPTOOLS else "h11",
        ws="none",
        timeout_keep_alive=_KEEP_ALIVE_S,
        timeout_graceful_shutdown=1,
        backlog=4096,
        **kwargs,
    )


class _ThreadedServer(uvicorn.Server):
    """A uvicorn server that never touches signal handlers (it does not own the main thread)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SimulatorServer:
    """The simulator on a loopback port, served from a daemon thread with its own event loop."""

    def __init__(self, profile: SimProfile | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_app(profile)
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server (the port actually bound when port=0)."""
        if self._url is None:
            raise RuntimeError("the simulator has not been started")
        return self._url

    def start(self, timeout: float = 10.0) -> SimulatorServer:
        if self._thread is not None:
            return self
        self._sock = _bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._url = _url(self._sock, self.host)
        self._server = _ThreadedServer(_config(self.app, quiet_logging=True))
        self._thread = threading.Thread(target=self._run, name="moa-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not start: {self._error!r}")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start(); a daemon thread has nobody else to tell
            self._error = e
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                # Hanging requests would otherwise hold the graceful shutdown until its timeout.
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self.app.close_requests)
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = self._loop = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_forever(
    profile: SimProfile | None = None,
    host: str = "127.0.0.1",
    port: int = 8900,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C or SIGTERM); ``on_ready`` gets the URL.

    Raises OSError when the address cannot be bound.
    """
    sock = _bind(host, port)
    server = uvicorn.Server(_config(create_app(profile), quiet_logging=False))
    if on_ready is not None:
        on_ready(_url(sock, host))
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(server.serve(sockets=[sock]))
    finally:
        sock.close()


@contextlib.contextmanager
def simulator_if_needed(cfg: MoAConfig, *, announce: bool = True) -> Iterator[MoAConfig]:
    """When calls go to the simulator and none is running, start one for the duration.

    Yields the config with ``simulator.url`` filled in. With API keys set (real mode) it changes nothing.
    """
    if not simulation_active(cfg) or cfg.simulator.url:
        yield cfg
        return
    profile = load_profile(cfg.simulator.profile) if cfg.simulator.profile else SimProfile()
    with SimulatorServer(profile) as server:
        if announce:
            print(
                f"No provider API key is set: answers come from the built-in simulator at {server.url} "
                "and are synthetic.",
                file=sys.stderr,
            )
        yield cfg.model_copy(update={"simulator": cfg.simulator.model_copy(update={"url": server.url})})
