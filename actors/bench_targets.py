"""The Ray side of ``moa bench``: the service on a local Ray instance, and the bare floor app.

The benchmark runner is core code and never imports Ray or this package by name: it finds this
module through the ``moa.bench`` entry point group (``ray`` in ``pyproject.toml``), so the core's
imports stay free of Ray and the Ray side can move without the runner knowing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from ray import serve
from rich.progress import Progress

from moa.benchmark.stats import percentile
from moa.config import MoAConfig
from moa_actors.probe import PROBES, build_probe
from moa_actors.ray_here import start_ray_here, stop_ray_here

# Timed requests per probe path (after a warm-up of 20).
FLOOR_REQUESTS = 200
# All of them, for the runner's progress bar.
FLOOR_TOTAL = FLOOR_REQUESTS * len(PROBES)


def start_service(cfg: MoAConfig, port: int) -> tuple[str, Callable[[], None]]:
    """The service on a new local Ray instance: its URL and the function that stops it all."""
    return start_ray_here(cfg, "127.0.0.1", port).url, stop_ray_here


async def measure_floor(
    url: str, progress: Progress, task: Any, requests: int = FLOOR_REQUESTS
) -> list[dict[str, Any]]:
    """The bare Serve app beside the service (same Ray instance and mode): HTTP and hop latencies,
    over ``requests`` timed requests a probe (fewer only where the figures are not the point)."""
    serve.run(build_probe(), name="floor", route_prefix="/floor")
    rows = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for path, what in PROBES.items():
                for _ in range(min(20, requests)):  # warm-up: connections, replicas' first calls
                    (await client.get(f"{url}/floor{path}")).raise_for_status()
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    (await client.get(f"{url}/floor{path}")).raise_for_status()
                    times.append(1000 * (time.perf_counter() - t0))
                    progress.advance(task)
                rows.append(
                    {
                        "path": path,
                        "what": what,
                        "requests": requests,
                        "p50_ms": percentile(times, 50),
                        "p99_ms": percentile(times, 99),
                    }
                )
    finally:
        serve.delete("floor")
    return rows
