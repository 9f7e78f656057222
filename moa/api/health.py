"""What the service offers and how it is: ``/v1/models`` (the presets and the models) and
``/healthz`` (whether the providers can answer)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from moa.config import MoAConfig

HealthFn = Callable[[], Awaitable[dict[str, Any]]]

# /healthz reports the providers' health only if it can learn it this fast.
HEALTH_TIMEOUT_S = 5.0


def model_objects(config: MoAConfig) -> list[dict[str, Any]]:
    """``/v1/models``: every preset (``auto`` first), then every model a plan may name directly."""
    presets = ["auto", *config.presets]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "moa"} for name in presets]
    data += [
        {"id": f"{p}/{m}", "object": "model", "created": 0, "owned_by": p} for p, m in config.all_models()
    ]
    return data


async def health_status(health: HealthFn, draining: bool, detail: bool = False) -> Response:
    """``ok`` when every provider can answer; ``degraded`` (200) when some cannot; ``down``
    (503) when none can; ``draining`` (503) once shutdown began. A provider can answer when it
    has a running replica (on Ray) whose circuit is not open.

    Probes need no key, so by default the body is the status alone: each provider's state,
    call counts and latency tell anyone who can reach the port which providers a deployment
    pays for and how busy it is. ``detail`` (the admin key was presented) adds them, and the
    answering process's own state (``process``: ``process_state``)."""
    if draining:
        return _health_response({"status": "draining", "providers": {}}, 503, detail)
    try:
        providers = await asyncio.wait_for(health(), HEALTH_TIMEOUT_S)
    except Exception as e:
        why = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
        body = {"status": "unknown", "providers": {}, "error": f"provider health unavailable: {why}"}
        return _health_response(body, 503, detail)
    up = sum(_can_answer(p) for p in providers.values())
    status = "ok" if up == len(providers) else "degraded" if up else "down"
    return _health_response({"status": status, "providers": providers}, 200 if up else 503, detail)


def _health_response(body: dict[str, Any], status: int, detail: bool) -> JSONResponse:
    if not detail:
        return JSONResponse({"status": body["status"]}, status_code=status)
    return JSONResponse({**body, "process": process_state()}, status_code=status)


def process_state() -> dict[str, int]:
    """What only the process itself can see, for an operator watching it over time: the tasks on
    its event loop (``asyncio_tasks``, this request's own included). Requests in flight each hold
    a few; a count that climbs while the load stays level is work that never ends (a task leak),
    which neither memory nor sockets show until much later. With its ``pid``: on Ray any ingress
    replica may answer. ``moa bench --soak`` reads it here."""
    return {"pid": os.getpid(), "asyncio_tasks": len(asyncio.all_tasks())}


def _can_answer(health: dict[str, Any]) -> bool:
    # In-process there is one client per provider; on Ray, "replicas" counts those reporting.
    if health.get("state") == "scaled_to_zero":
        return True  # autoscaled down to none: a request brings a replica back
    return health.get("replicas", 1) > 0 and health.get("state") in ("closed", "half_open", "degraded")
