"""A bare Ray Serve app with the service's shape and none of its work: what an HTTP request and
each handle hop cost on this machine, in this Serve mode, before any MoA code runs.

``moa bench --targets floor`` deploys it beside the service and reports its latencies, so the
service's overhead can be read against the floor that its number of sequential hops implies.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application

# The paths the benchmark times, and the hops each one makes after the HTTP request.
PROBES = {
    "/http": "the HTTP request alone (no handle call)",
    "/hop": "one handle call",
    "/fan-out": "three handle calls in parallel, to three deployments (a proposer layer)",
    "/chain": "two handle calls in sequence (ingress -> relay -> echo)",
}

_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0.01}, "max_ongoing_requests": 1000}

probe_api = FastAPI(docs_url=None, redoc_url=None)


class Echo:
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


class Relay:
    def __init__(self, echo: Any) -> None:
        self.next = echo

    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.next.echo.remote(payload)
        return result


@serve.ingress(probe_api)
class ProbeIngress:
    def __init__(self, echoes: list[Any], relay: Any) -> None:
        self.echoes, self.relay = echoes, relay

    @probe_api.get("/http")
    async def http(self) -> dict[str, Any]:
        return {"hops": 0}

    @probe_api.get("/hop")
    async def hop(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.echoes[0].echo.remote({"hops": 1})
        return result

    @probe_api.get("/fan-out")
    async def fan_out(self) -> dict[str, Any]:
        results = await asyncio.gather(*(e.echo.remote({"hops": 1}) for e in self.echoes))
        return {"hops": 1, "parallel": len(results)}

    @probe_api.get("/chain")
    async def chain(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.relay.echo.remote({"hops": 2})
        return result


def build_probe() -> Application:
    echoes = [serve.deployment(Echo, name=f"echo-{i}", **_OPTIONS).bind() for i in range(3)]
    relay = serve.deployment(Relay, name="relay", **_OPTIONS).bind(echoes[0])
    return serve.deployment(ProbeIngress, name="probe", **_OPTIONS).bind(echoes, relay)
