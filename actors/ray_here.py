"""A new Ray instance in this process with the app deployed (``start_ray_here``), and its stop
(``stop_ray_here``): what ``moa serve`` runs the service on (``moa_actors.lifecycle``), and the Ray
tools too (``bench_targets``, ``cache_bench``). The app itself is wired in ``moa_actors.app``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypedDict, Unpack, cast

from ray import serve

from moa.config import MoAConfig
from moa.service import StopSignals
from moa_actors.app import THROUGHPUT_ENV, build_from_config
from moa_actors.haproxy_launcher import BINARY_ENV, ENABLE_ENV, haproxy_binary

# Only for a Ray instance started here, as `moa serve` starts one. With direct ingress Serve keeps a
# stopping ingress replica reachable for 30 s, for external load balancers to deregister it;
# `moa serve` has none, and has drained the ingress itself (server.drain_s) before it stops Serve.
# Serve gives a new HTTP proxy 5 s to say it is ready, then kills it; on a loaded two-CPU machine
# starting its worker takes longer, and `serve.start` then fails with the proxy "killed by
# ray.kill". A minute is still a bound, and only start-up waits on it.
RAY_HERE_ENV = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}
# How long `moa serve` gives Serve to stop its replicas after the drain; Ray itself stops after.
SERVE_SHUTDOWN_S = 15.0


@dataclass
class RayHere:
    """What `moa serve` started: where the API, the metrics and the dashboard answer."""

    url: str
    metrics_port: int | None
    dashboard_url: str | None


class QuietServe(logging.Filter):
    """Drops the records of Serve's logger that read as trouble on a clean ``moa serve`` run.

    ``serve.run`` after ``serve.start`` (which ``moa serve`` calls to set the proxy's options)
    connects to the Serve instance just started and says its "New http_options/controller_options
    will not be applied" (they were, by ``serve.start``); the first handle the drain opens logs
    "Started <...SharedRouterLongPollClient object at 0x...>". Both come from ``ray.serve`` in
    this process (ray/serve/_private/api.py, router.py); every other record passes."""

    NOISE = (
        re.compile(r'Connecting to existing Serve app in namespace "\w+"\. New http_options'),
        re.compile(
            r"Started <ray\.serve\._private\.router\.SharedRouterLongPollClient object at 0x[0-9a-f]+>"
        ),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.NOISE)


class RayHereOptions(TypedDict, total=False):
    """How ``start_ray_here`` and ``run_on_ray_here`` start the Ray instance."""

    num_cpus: float | None  # Ray's CPU count (None: the machine's)
    quiet: bool  # keep the replicas' output off the terminal (default True)
    metrics_port: int | None  # Ray's Prometheus port (None: Ray picks one)
    dashboard: bool  # start Ray's dashboard (default False)
    sock: socket.socket | None  # the HTTP port, claimed beforehand (``claim_port``)
    keys_required: bool  # an API key exists, so callers need one (default: asked of the store)
    haproxy: bool  # HAProxy in front of the ingress, splicing off (``haproxy_in_front``)
    env: dict[str, str]  # set before Ray starts, over what the environment holds


def start_ray_here(cfg: MoAConfig, host: str, port: int, **options: Unpack[RayHereOptions]) -> RayHere:
    """A new local Ray instance (never one already running) with the app deployed.

    ``sock``, the HTTP port claimed beforehand (``claim_port``), is let go just before Serve's
    proxy binds the port. ``stop_ray_here`` ends it all.
    """
    import ray

    dashboard, sock = options.get("dashboard", False), options.get("sock")
    if options.get("quiet", True):
        logging.getLogger("ray.serve").addFilter(QuietServe())
    for key, value in {**THROUGHPUT_ENV, **RAY_HERE_ENV}.items():
        os.environ.setdefault(key, value)  # set before Ray starts: its processes inherit it
    os.environ.update(options.get("env", {}))
    # address="local": a new instance even when `ray start` left one running on this machine,
    # which a plain ray.init() would join (and `moa serve` would then shut down someone's Serve).
    context = ray.init(
        address="local",
        num_cpus=options.get("num_cpus"),
        include_dashboard=dashboard,
        log_to_driver=not options.get("quiet", True),
        _metrics_export_port=options.get("metrics_port"),
    )
    # Ray's core worker installs its own SIGTERM handler (it aborts the process, leaving Ray's
    # agents behind): ours again, until the service is up a signal aborts start-up cleanly.
    StopSignals.interrupt_meanwhile()
    if sock is not None:
        sock.close()
    # Serve's proxy takes a keep-alive timeout (server.keep_alive_s; Serve's own default, 90 s, is
    # for load balancers, which `moa serve` has none of) but no request-head timeout: see the README.
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": cfg.server.keep_alive_s})
    serve.run(build_from_config(cfg), name="moa", route_prefix="/")
    dashboard_url = getattr(context, "dashboard_url", None) if dashboard else None
    return RayHere(
        url=f"http://{host}:{port}",
        metrics_port=_metrics_port(),
        dashboard_url=f"http://{dashboard_url}" if dashboard_url else None,
    )


@contextmanager
def haproxy_in_front() -> Iterator[dict[str, str]]:
    """The environment that puts Ray's HAProxy in front of the ingress with splicing off: Ray runs
    the binary ``RAY_SERVE_HAPROXY_BINARY_PATH`` names, here a two-line launcher (in a temp dir of
    its own, removed on exit) running ``moa_actors.haproxy_launcher`` with this very interpreter,
    which Ray's processes run too. Written rather than the ``moa-haproxy`` script looked up, so it
    holds however moa-serve was installed (or not, from a checkout on ``PYTHONPATH``).

    Raises ``HAProxyUnavailable`` (before anything is written) when there is no binary to run."""
    haproxy_binary()
    with tempfile.TemporaryDirectory(prefix="moa-haproxy-") as folder:
        launcher = Path(folder) / "moa-haproxy"
        launcher.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m moa_actors.haproxy_launcher "$@"\n'
        )
        launcher.chmod(0o755)
        yield {ENABLE_ENV: "1", BINARY_ENV: str(launcher)}


def _metrics_port() -> int | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return int(node["MetricsExportPort"])
    return None


class QuietStop:
    """A stream that drops the raylet's reports of the actors a stop kills, and passes the rest.

    Serve's shutdown ends with its controller killing itself, so the tasks still waiting on it
    (``serve.shutdown()``'s own ``graceful_shutdown``, a handle's ``listen_for_change``) fail,
    and Ray's error listener prints each as "(raylet) Task ServeController... failed ... killed by
    `ray.kill`" with colour codes: a traceback on every clean stop of ``moa serve``, which stopped
    those actors on purpose. The listener prints each report with one ``print`` (its text, then
    the line end: ray/_private/worker.py ``print_worker_logs``), so a write is dropped whole."""

    KILLED = re.compile(r"\(raylet\).*killed by `ray\.kill`", re.DOTALL)

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._dropped = False  # the last write was a dropped report: its line end goes too

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, bool(self.KILLED.search(text))
        if self._dropped or (dropped and text == "\n"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def quiet_stop() -> Iterator[None]:
    """Standard output and error through ``QuietStop`` while Serve and Ray stop."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = cast(TextIO, QuietStop(out)), cast(TextIO, QuietStop(err))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


def stop_ray_here(timeout_s: float = SERVE_SHUTDOWN_S, quiet: bool = True) -> None:
    """Serve, then Ray. Serve gets ``timeout_s`` to stop its replicas; Ray's shutdown ends the
    processes of this instance in any case. ``quiet``: without the raylet's reports of the
    actors the stop kills (``QuietStop``)."""
    import ray

    with quiet_stop() if quiet else nullcontext():
        if ray.is_initialized():
            stopping = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
            stopping.start()
            stopping.join(timeout_s)
        ray.shutdown()
