"""What ``moa serve`` does the same way with Ray and without: claiming the port, the start-up
banner, and turning SIGINT/SIGTERM into a graceful stop (then, on a second signal, an immediate one)."""

from __future__ import annotations

import errno
import signal
import socket
from collections.abc import Callable
from types import FrameType

from moa.config import MoAConfig, simulation_active
from moa_observability.tracing import tracing_configured


class PortInUse(Exception):
    """The HTTP port cannot be had: another server (a second ``moa serve``, say) listens on it."""


def claim_port(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ``PortInUse`` naming the port.

    The socket does not share its port (no ``SO_REUSEPORT``): if anything already listens there,
    binding fails, where Ray Serve's proxy (which shares its port) would start anyway and the
    kernel would spread requests between two unrelated services. ``SO_REUSEADDR`` only lets a
    restart reuse a port whose old connections are in TIME_WAIT.

    The protocol is named (``IPPROTO_TCP``, not the default 0): the connections it accepts inherit
    it, and asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on sockets that say they are
    TCP. Without it a response written in two pieces (its head, then its body) waited for the
    client's delayed acknowledgement: 40 ms added to every answer of ``moa serve --local``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use (is another moa serve running?); "
                "stop it or choose another port with --port"
            ) from None
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def example_model(cfg: MoAConfig) -> str:
    """A model name the start-up hint can show that this config really serves."""
    if "moa" in cfg.presets:
        return "moa"
    if cfg.default_preset != "auto":
        return cfg.default_preset
    if cfg.presets:
        return next(iter(cfg.presets))
    provider, model = cfg.all_models()[0]
    return f"{provider}/{model}"


# Where a client keeps the key it sends: the client commands read it (``--api-key`` overrides).
KEY_ENV = "MOA_API_KEY"


def banner(
    cfg: MoAConfig, url: str, *, mode: str, keys_required: bool, extra: list[str] | None = None
) -> list[str]:
    """The lines ``moa serve`` prints once it answers: where, how to call it, where to look.

    The example calls are ones that work in the state the service is in: once any API key exists
    every request needs one (a keyless ``curl`` or ``api_key='unused'`` gets a 401), so they send
    the key from ``$MOA_API_KEY`` and say how to get one; the keyless form is shown only while
    the service is open (no key exists)."""
    simulated = simulation_active(cfg) and not cfg.simulator.url
    model = example_model(cfg)
    lines = [f"MoA service ready at {url}  (OpenAI-compatible: {url}/v1; {mode})"]
    if simulated:
        lines.append(
            "No provider API key is set: every provider is the built-in simulator; answers are synthetic."
        )
    if keys_required:
        lines += [
            f"API keys are required: send yours as ${KEY_ENV} (`moa keys create NAME` prints a new one, "
            f"once; then export {KEY_ENV}=<the key>).",
            f'  curl -H "Authorization: Bearer ${KEY_ENV}" {url}/v1/models',
            f"  OpenAI(base_url='{url}/v1', api_key=os.environ['{KEY_ENV}'])"
            f".chat.completions.create(model='{model}', ...)",
        ]
    else:
        lines += [
            f"  curl {url}/v1/models",
            f"  OpenAI(base_url='{url}/v1', api_key='unused').chat.completions.create(model='{model}', ...)",
        ]
    lines += [
        *(extra or []),
        "  " + tracing_line(),
        f"Ctrl-C or SIGTERM stops it: new requests get 503, those in progress get up to "
        f"{cfg.server.drain_s:g} s (server.drain_s) to finish; a second Ctrl-C ends them at once.",
    ]
    return lines


def ray_lines(metrics_port: int | None, dashboard_url: str | None, token_auth: bool) -> list[str]:
    """The banner's lines about the local Ray instance ``moa serve`` started.

    ``token_auth``: Ray's token authentication is on (a new local instance turns it on unless
    ``RAY_AUTH_MODE`` says otherwise). Ray's CLI then sends its token only when ``RAY_AUTH_MODE=token``
    is in its own environment, so the ``serve status`` shown carries it (without it the command
    fails with an ``AuthenticationError``)."""
    lines = [f"  Metrics (Prometheus): http://127.0.0.1:{metrics_port}/metrics"] if metrics_port else []
    if dashboard_url:
        prefix = "RAY_AUTH_MODE=token " if token_auth else ""
        lines += [f"  Ray dashboard: {dashboard_url}", f"  {prefix}serve status --address {dashboard_url}"]
    return lines


def tracing_line() -> str:
    import os

    if not tracing_configured():
        return (
            "Tracing: not exported (set OTEL_EXPORTER_OTLP_ENDPOINT to export); each response's "
            "x-moa-trace-id still names its request in the logs."
        )
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return f"Tracing: OTLP export to {endpoint} (service {os.environ.get('OTEL_SERVICE_NAME', 'moa')})"


def draining_message(cfg: MoAConfig) -> str:
    return (
        f"Stopping: new requests get 503; those in progress have up to {cfg.server.drain_s:g} s "
        "to finish (Ctrl-C again to end them now)..."
    )


class StopSignals:
    """SIGINT and SIGTERM (what process managers and Kubernetes send) ask for a graceful stop;
    a second one asks to hurry. The handlers are installed explicitly, so they work even where
    the process started with SIGINT ignored (a background job of a non-interactive shell)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_stop: Callable[[], None], on_hurry: Callable[[], None]) -> None:
        self.on_stop, self.on_hurry = on_stop, on_hurry
        self.received = 0

    def __call__(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.received += 1
        (self.on_stop if self.received == 1 else self.on_hurry)()

    def install(self) -> None:
        """With ``signal.signal``: for a thread that blocks (the Ray driver waits on an event)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self)

    def install_in_loop(self) -> None:
        """With the running event loop's signal handling (``moa serve --local``)."""
        import asyncio

        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self)

    @classmethod
    def interrupt_meanwhile(cls) -> None:
        """Until the service is up, both signals abort start-up (as Ctrl-C does), cleaning up."""

        def abort(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        for sig in cls.SIGNALS:
            signal.signal(sig, abort)
