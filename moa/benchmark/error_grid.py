"""The run that ``moa bench --tools`` and ``moa bench --structured`` share: the embedded simulator
behind the API app in this process, every task sent for every configuration at every error rate,
one row per configuration and rate, each compared with the first configuration's at that rate.

What differs between the two benchmarks (the tasks, how an answer is asked for and scored, what a
row holds and how it compares) is passed in as a ``Grid``; the loop, the profile switching between
rates and the run's environment are written once, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import httpx

from moa.benchmark.runner import bench_config
from moa.local import local_app
from moa.simulator.profile import parse_profile
from moa.simulator.server import SimulatorServer

T = TypeVar("T")  # a task
C = TypeVar("C")  # a configuration
R = TypeVar("R")  # one request's outcome

WHAT = "in-process API (moa serve --local's app over an ASGI transport), the embedded simulator"


class GridOptions(Protocol):
    """The options both benchmarks take for the run itself."""

    @property
    def error_rates(self) -> Sequence[float]: ...
    @property
    def repeats(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def tokens_per_s(self) -> float: ...
    @property
    def jitter(self) -> float: ...
    @property
    def layer_deadline_s(self) -> float: ...


@dataclass(frozen=True)
class Grid(Generic[T, C, R]):
    """One benchmark's parts: ``compare`` gives a row's entry under ``compare_key`` (what it is
    against the first configuration's row and outcomes at the same rate)."""

    tasks: Sequence[T]
    configs: Sequence[C]
    label: Callable[[C], str]
    error_profile: Callable[[float, float, float, float], dict[str, Any]]
    ask: Callable[[httpx.AsyncClient, T, C, int], Awaitable[R]]
    summarize: Callable[[C, float, Sequence[R]], dict[str, Any]]
    compare_key: str
    compare: Callable[[dict[str, Any], Sequence[R], dict[str, Any], Sequence[R]], dict[str, Any]]
    cell_line: Callable[[dict[str, Any]], str]


def grid_options(opts: GridOptions, error_kinds: Sequence[str]) -> dict[str, Any]:
    """The report's options that say how the run ran (after the configurations)."""
    return {
        "error_rates": list(opts.error_rates),
        "error_kinds": list(error_kinds),
        "repeats": opts.repeats,
        "concurrency": opts.concurrency,
        "ttft_s": opts.ttft_s,
        "tokens_per_s": opts.tokens_per_s,
        "jitter": opts.jitter,
    }


@contextlib.asynccontextmanager
async def _service(
    opts: GridOptions, profile: dict[str, Any]
) -> AsyncIterator[tuple[httpx.AsyncClient, SimulatorServer]]:
    """The embedded simulator, and a client of the API app over it in this process."""
    with SimulatorServer(parse_profile(profile)) as sim:
        cfg = bench_config(sim.url, opts.layer_deadline_s)
        async with (
            local_app(cfg) as app,
            httpx.AsyncClient(
                # A loopback client, as moa batch's in-process sender is: served without keys.
                transport=httpx.ASGITransport(app=app),
                base_url="http://127.0.0.1",
                timeout=None,
            ) as client,
        ):
            yield client, sim


async def run_grid(
    grid: Grid[T, C, R], opts: GridOptions, on_step: Callable[[str | None], None] | None = None
) -> dict[str, Any]:
    """Every task, for every configuration at every error rate; ``on_step`` hears of each request
    answered (None) and each finished cell (its line). The report's ``environment`` and ``rows``."""
    tasks, configs = grid.tasks, grid.configs
    seeds = range(1, opts.repeats + 1)
    step = on_step or (lambda _: None)
    load_at_start = list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    quiet = grid.error_profile(0.0, opts.ttft_s, opts.tokens_per_s, opts.jitter)
    async with _service(opts, quiet) as (client, sim):
        sem = asyncio.Semaphore(opts.concurrency)

        async def bounded(task: T, config: C, seed: int) -> R:
            async with sem:
                out = await grid.ask(client, task, config, seed)
            step(None)
            return out

        for config in configs:  # uncounted: SDK clients and connection pools are set up once
            await grid.ask(client, tasks[0], config, 0)
        for rate in opts.error_rates:
            profile = grid.error_profile(rate, opts.ttft_s, opts.tokens_per_s, opts.jitter)
            async with httpx.AsyncClient(base_url=sim.url) as admin:
                (await admin.put("/admin/profile", json=profile)).raise_for_status()
            # The configurations take turns, task by task: a busy moment on a shared machine
            # slows them alike, so their latencies compare.
            jobs = [(t, c, s) for t in tasks for s in seeds for c in configs]
            done = await asyncio.gather(*(bounded(t, c, s) for t, c, s in jobs))
            base_outcomes = [o for (_, c, _), o in zip(jobs, done, strict=True) if c == configs[0]]
            base = grid.summarize(configs[0], rate, base_outcomes)
            for config in configs:
                outcomes = [o for (_, c, _), o in zip(jobs, done, strict=True) if c == config]
                row = grid.summarize(config, rate, outcomes)
                if config != configs[0]:  # the first one's answers to the same tasks, seeds and draws
                    compared = grid.compare(row, outcomes, base, base_outcomes)
                    row[grid.compare_key] = {"with": grid.label(configs[0]), **compared}
                rows.append(row)
                step(grid.cell_line(row))
    return {
        "environment": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "loadavg": {"start": load_at_start, "end": list(os.getloadavg())},
        },
        "rows": rows,
    }


__all__ = ["WHAT", "Grid", "GridOptions", "grid_options", "run_grid"]
