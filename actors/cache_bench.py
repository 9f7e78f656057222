"""The Ray side of ``moa bench --cache --serve``: the response-cache workload against the Serve app,
the topology users deploy, instead of the in-process API; and the floor a hit is measured against.
Kept out of ``moa/`` so that the core package never imports Ray.

A hit through Serve crosses Serve's HTTP proxy, a request to the ingress replica, a call from the
replica back to the proxy for the request body (Serve's proxy forwards only the headers), and the
response's way back. The floor app here does the same with no work: a GET (no body, the ``/http``
row of ``moa bench --targets floor``) and a POST whose JSON body it reads, each through the proxy
and through the replica's own port (direct ingress, on in ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode).
"""

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
from fastapi import FastAPI, Request
from ray import serve

from moa.benchmark.stats import percentile
from moa.config import MoAConfig

FLOOR_APP = "cache-floor"
# Serve's range for direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT).
DIRECT_PORTS = range(30000, 31001)

floor_api = FastAPI(docs_url=None, redoc_url=None)


@serve.ingress(floor_api)
class FloorIngress:
    """No work: what Serve's HTTP entry costs a GET and a POST whose body is read. (No postponed
    annotations in this module: FastAPI must see ``Request`` itself to pass the request.)"""

    @floor_api.get("/get")
    async def get(self) -> dict[str, Any]:
        return {"ok": True}

    @floor_api.post("/post")
    async def post(self, request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())
        return {"ok": True, "keys": len(body)}


@dataclass
class ServedApp:
    url: str
    # The ingress replica's own port (direct ingress), when Serve opened one.
    direct_url: str | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def direct_url(app: str, route_prefix: str = "") -> str | None:
    """The direct-ingress URL of ``app``'s ingress replica: the port its process listens on in
    Serve's direct-ingress range (Serve names the process ``ServeReplica:<app>:<deployment>``).
    Only among this process's descendants: other Ray instances on the machine have replicas too."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if not any(f"ServeReplica:{app}:" in part for part in proc.cmdline()):
                continue
            ports = sorted(
                c.laddr.port
                for c in proc.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port in DIRECT_PORTS
            )
        except psutil.Error:
            continue
        if ports:
            return f"http://127.0.0.1:{ports[0]}{route_prefix}"
    return None


@contextlib.asynccontextmanager
async def served_on_ray(cfg: MoAConfig) -> AsyncIterator[ServedApp]:
    """The app on a new local Ray instance, as ``moa serve`` starts it.

    Started on the calling thread (``start_ray_here`` installs signal handlers, which only the main
    thread may): the bench has nothing else to run on its loop meanwhile."""
    from moa_actors.ray_here import start_ray_here, stop_ray_here

    url = start_ray_here(cfg, "127.0.0.1", _free_port()).url
    try:
        yield ServedApp(url=url, direct_url=direct_url("moa"))
    finally:
        stop_ray_here()


async def _time(client: httpx.AsyncClient, method: str, url: str, body: Any, n: int) -> dict[str, Any]:
    for _ in range(20):  # warm-up: connections, the replica's first calls
        (await client.request(method, url, json=body)).raise_for_status()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        (await client.request(method, url, json=body)).raise_for_status()
        times.append(1000 * (time.perf_counter() - t0))
    return {"n": n, "p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95)}


async def measure_floor(url: str, direct: str | None, body: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The bare floor app beside the service (same Ray instance and mode), timed at concurrency 1
    with the hits' own request body: through the proxy and, when Serve opened one, direct."""
    serve.run(
        serve.deployment(FloorIngress, name="floor", ray_actor_options={"num_cpus": 0.01}).bind(),
        name=FLOOR_APP,
        route_prefix=f"/{FLOOR_APP}",
    )
    rows = []
    try:
        # Only with direct ingress on for the service too (the same Serve mode).
        mine = direct_url(FLOOR_APP, f"/{FLOOR_APP}") if direct is not None else None
        bases = {"proxy": f"{url}/{FLOOR_APP}", "direct": mine}
        async with httpx.AsyncClient(timeout=30) as client:
            for via, base in bases.items():
                if base is None:
                    continue
                for method, path, sent in (("GET", "/get", None), ("POST", "/post", body)):
                    row = await _time(client, method, base + path, sent, n)
                    rows.append({"via": via, "request": f"{method} {path}", **row})
    finally:
        serve.delete(FLOOR_APP)
    return rows
