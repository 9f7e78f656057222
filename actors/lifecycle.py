"""``moa serve`` on Ray: the app on a Ray instance started here until SIGINT or SIGTERM, then a
drain and a bounded stop (``run_on_ray_here``). What is started and stopped is
``moa_actors.ray_here``'s; the drain is asked of the health board, which every ingress replica
checks in with.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Unpack

from ray import serve

from moa.api.app import CUT_GRACE_S
from moa.config import MoAConfig
from moa.exposure import keys_exist
from moa.service import StopSignals, banner, claim_port, draining_message, ray_lines
from moa_actors.haproxy_launcher import HAProxyUnavailable, haproxy_binary
from moa_actors.health_board import HEALTH_BOARD_NAME
from moa_actors.ingress import HEALTH_REFRESH_S
from moa_actors.ray_here import RayHereOptions, haproxy_in_front, start_ray_here, stop_ray_here

# The banner's line when `moa serve --haproxy` put HAProxy in front.
HAPROXY_LINE = "  HAProxy in front of the ingress (Ray's, splicing off: a client that leaves is passed on)"


def haproxy_problem() -> str | None:
    """Why ``moa serve --haproxy`` cannot run (no HAProxy binary), or None: asked before anything
    is started."""
    try:
        haproxy_binary()
    except HAProxyUnavailable as e:
        return str(e)
    return None


def drain_app(
    drain_s: float, hurry: threading.Event, app_name: str = "moa", say: Callable[[str], None] = print
) -> None:
    """Drain every ingress replica of the app: they refuse new requests (503), give those in
    progress ``drain_s``, then end the rest. Returns once every replica reports it is done (or
    a bound well past ``drain_s``). ``hurry`` set (a second Ctrl-C) ends the requests at once.

    A slow answer from the health board (a loaded machine) never cuts the drain short: the
    request to drain is sent again until it is taken, and only the bound ends the wait. The board
    is awaited on an event loop of this call's own: with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the
    environment before Ray is imported, Serve's handles refuse blocking ``.result()`` calls
    outside one."""
    asyncio.run(_drain(drain_s, hurry, app_name, say))


async def _drain(drain_s: float, hurry: threading.Event, app_name: str, say: Callable[[str], None]) -> None:
    board = serve.get_deployment_handle(HEALTH_BOARD_NAME, app_name=app_name)
    # Each replica notices within a health refresh, drains, ends what is left, and says so.
    end = time.monotonic() + drain_s + CUT_GRACE_S + 4 * HEALTH_REFRESH_S + 5
    asked, hurried = False, False
    while time.monotonic() < end:
        left = max(0.5, end - time.monotonic())
        try:
            if not asked or (hurry.is_set() and not hurried):
                hurried = hurry.is_set()
                await asyncio.wait_for(board.drain.remote(drain_s, hurry=hurried), min(10.0, left))
                asked = True
            replicas = await asyncio.wait_for(board.drain_status.remote(), min(5.0, left))
        except Exception as e:  # slow or restarting: ask again, within the bound
            say(f"The health board did not answer ({type(e).__name__}: {e}); asking again.")
            await asyncio.sleep(0.2)
            continue
        if replicas and all(r["drained"] for r in replicas.values()):
            cut = sum(r["cut"] for r in replicas.values())
            if cut:
                say(f"Drain time over: {cut} request(s) still running were ended.")
            return
        await asyncio.sleep(0.1)
    say("Some ingress replica did not report its drain in time; stopping anyway.")


def run_on_ray_here(cfg: MoAConfig, host: str, port: int, **options: Unpack[RayHereOptions]) -> int:
    """`moa serve`: a new Ray instance in this process with the app, until SIGINT or SIGTERM; then a drain
    (``server.drain_s``) and a bounded shutdown. Returns the exit status."""
    sock = options.get("sock") or claim_port(host, port)  # before Ray starts: a port in use fails here
    stop, hurry = threading.Event(), threading.Event()
    StopSignals.interrupt_meanwhile()  # until it answers, a signal aborts start-up
    haproxy = options.get("haproxy", False)
    # The HAProxy launcher's file stays until Ray has stopped: Serve runs it again on each reload.
    with ExitStack() as launcher:
        try:
            env = launcher.enter_context(haproxy_in_front()) if haproxy else {}
            try:
                started = start_ray_here(cfg, host, port, **{**options, "sock": sock, "env": env})
            except Exception as e:  # Ray or Serve did not come up (a loaded machine, a Ray error)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(f"moa serve: Ray Serve did not start: {type(e).__name__}: {first}", file=sys.stderr)
                return 1
            StopSignals(stop.set, hurry.set).install()
            # ray.init sets RAY_AUTH_MODE=token in this process when it turns token auth on.
            token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            extra = ray_lines(started.metrics_port, started.dashboard_url, token_auth)
            if haproxy:
                extra.append(HAPROXY_LINE)
            keys = options["keys_required"] if "keys_required" in options else keys_exist(cfg.state)
            lines = banner(cfg, started.url, mode="on a local Ray instance", keys_required=keys, extra=extra)
            print("\n".join(lines), flush=True)
            while not stop.wait(0.5):
                pass
            print(draining_message(cfg), flush=True)
            drain_app(cfg.server.drain_s, hurry)
            print("Stopping Serve and Ray...", flush=True)
        finally:
            sock.close()
            stop_ray_here(quiet=options.get("quiet", True))
    return 0
