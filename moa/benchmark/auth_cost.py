"""``moa bench --auth-overhead``: what key checking and budget reservation cost per request.

One in-process API (the same app the Ray ingress serves, with the in-process provider pool) is
served three ways side by side, each on its own loopback port against one simulator:

- ``open``: no state store, so no key is checked and nothing is reserved;
- ``key``: a key with no limits: the key check (its record cached per ``state.key_cache_s``),
  a reservation and its settlement in the ledger;
- ``key+budget``: a key with a budget and a requests-per-minute limit: the per-minute count and
  the budget check in the reservation too.

The variants take turns in small blocks at each concurrency level, so a busy moment on a shared
machine falls on all of them alike. Each figure is the orchestration overhead (end-to-end time
minus the simulated model time on the critical path, as in the main benchmark); the difference
of each keyed variant from ``open`` is the cost of the checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn

from moa.api.app import create_api
from moa.auth import new_key, new_record
from moa.benchmark.runner import HttpTarget, Simulator, _free_port, bench_config, load_prompts
from moa.benchmark.stats import Sample, percentile, summarize
from moa.engine.assembly import assemble
from moa.providers.registry import ProviderPool
from moa.state import KeyLimits, StateStore
from moa.types import HealthView

MODEL = "single"  # one model call: the checks are the largest share of what it adds
BLOCK = 10  # requests per variant before the next variant's turn
CHECKS = 400  # timed rounds of the checks alone, per variant


async def time_checks(cfg: Any, store: StateStore | None, key: str | None, n: int = CHECKS) -> dict[str, Any]:
    """The checks alone, without HTTP or models, as a request runs them: the key check (and the
    per-minute count), the cost projection and reservation, then the settlement."""
    import time

    from moa.api.access import Access, Spend
    from moa.engine.cost import Routed
    from moa.result import RouteDecision
    from moa.types import ChatMessage, GenerationParams

    access = Access(cfg, store)
    plan = cfg.presets[MODEL]
    routed: Routed = (plan, RouteDecision(preset=MODEL, forced=True, reason="bench"), [])
    messages = [ChatMessage(role="user", content="Name a colour.")]
    params = GenerationParams(max_tokens=100)
    header = f"Bearer {key}" if key else None
    times = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        principal = await access.principal(header)
        _, projected = access.fit(principal, routed, messages, params, None, HealthView)
        cost = projected.cost_usd
        spend = Spend(access, principal, await access.hold(principal, cost), cost)
        spend.cost_usd = 0.0001
        await spend.settle()
        if i >= 20:  # the first rounds warm the store's connection and the key's cache
            times.append(1000 * (time.perf_counter() - t0))
    return {"rounds": n, "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


@contextlib.asynccontextmanager
async def _served(cfg: Any, store: StateStore | None) -> AsyncIterator[str]:
    port = _free_port()
    async with ProviderPool.from_config(cfg, sim_url=cfg.simulator.url) as pool:
        engine = assemble(cfg, pool)

        async def health() -> dict[str, Any]:
            return pool.health()

        app = create_api(cfg, engine, health, store, run_batches=False)  # timing the checks alone
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:  # noqa: ASYNC110  (uvicorn offers a flag, not an event)
                await asyncio.sleep(0.01)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task
            if store is not None:
                await store.close()


def _stores(state_dir: Path, redis_url: str | None) -> Callable[[str], StateStore]:
    def make(name: str) -> StateStore:
        if redis_url:
            from moa.state.redis_store import RedisStore

            return RedisStore(redis_url)
        from moa.state.sqlite_store import SQLiteStore

        return SQLiteStore(state_dir / f"{name}.db")

    return make


async def run_auth_overhead(
    concurrency: list[int],
    requests: int,
    ttft_s: float,
    tokens_per_s: float,
    jitter: float,
    redis_url: str | None = None,
    prompts_path: Path | None = None,
) -> dict[str, Any]:
    prompts = load_prompts(prompts_path)
    sim = Simulator(ttft_s, tokens_per_s, jitter)
    cfg = bench_config(sim.url, 30.0)
    report: dict[str, Any] = {
        "what": "in-process API (uvicorn, one process), model 'single', overhead = e2e - simulated",
        "store": "redis" if redis_url else "sqlite",
        "options": {
            "concurrency": concurrency,
            "requests": requests,
            "ttft_s": ttft_s,
            "tokens_per_s": tokens_per_s,
            "jitter": jitter,
        },
        "levels": [],
        "checks_alone": [],
    }
    variants: dict[str, KeyLimits | None] = {
        "open": None,
        "key": KeyLimits(detail=True),
        "key+budget": KeyLimits(detail=True, budget_usd=1_000_000.0, period="month", rpm=1_000_000),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="moa-bench-auth-") as tmp:
            make = _stores(Path(tmp), redis_url)
            if redis_url:
                flush = make("flush")
                await flush.client.flushdb()  # type: ignore[attr-defined]
                await flush.close()
            async with contextlib.AsyncExitStack() as stack:
                targets: dict[str, HttpTarget] = {}
                for i, (name, limits) in enumerate(variants.items()):
                    key = None
                    store = None
                    if limits is not None:
                        store = make(name)
                        key = new_key()
                        await store.create_key(new_record(f"bench-{i}", key, limits))
                    url = await stack.enter_async_context(_served(cfg, store))
                    targets[name] = HttpTarget(url, MODEL, api_key=key)
                for name, limits in variants.items():
                    # A store of its own (same kind) so the served variants' ledgers stay apart.
                    alone = make(f"alone-{name}") if limits is not None else None
                    key = None
                    if alone is not None and limits is not None:
                        key = new_key()
                        await alone.create_key(new_record(f"alone-{name}", key, limits))
                    try:
                        row = await time_checks(cfg, alone, key)
                    finally:
                        if alone is not None:
                            await alone.close()
                    report["checks_alone"].append({"variant": name, **row})
                for t in targets.values():
                    for _ in range(3):  # warm-up: connections, the key's cache, SQLite's pages
                        await t.send(prompts[0])
                for c in concurrency:
                    samples = await _interleaved(targets, prompts, c, max(requests, 2 * c))
                    base = summarize(samples["open"], 1.0, 0.0, 0.0)
                    for name, got in samples.items():
                        row = summarize(got, 1.0, 0.0, 0.0)
                        report["levels"].append(
                            {
                                "variant": name,
                                "concurrency": c,
                                "requests": row["requests"],
                                "errors": row["errors"],
                                "p50_ms": row["p50_ms"],
                                "p99_ms": row["p99_ms"],
                                "overhead_p50_ms": row["overhead_p50_ms"],
                                "overhead_p99_ms": row["overhead_p99_ms"],
                                "added_p50_ms": row["overhead_p50_ms"] - base["overhead_p50_ms"],
                                "added_p99_ms": row["overhead_p99_ms"] - base["overhead_p99_ms"],
                            }
                        )
                for t in targets.values():
                    await t.client.aclose()
    finally:
        sim.stop()
    return report


def write_auth_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "auth-overhead.json").write_text(json.dumps(report, indent=2))
    (out / "auth-overhead.md").write_text(auth_markdown(report))


async def _interleaved(
    targets: dict[str, HttpTarget], prompts: list[str], concurrency: int, n: int
) -> dict[str, list[Sample]]:
    """``n`` requests per variant at ``concurrency``, the variants taking turns in blocks."""
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    done = 0
    while done < n:
        block = min(max(BLOCK, concurrency), n - done)
        for name, target in targets.items():
            counter = iter(range(done, done + block))

            async def worker(
                t: HttpTarget = target, into: list[Sample] = samples[name], ids: Any = counter
            ) -> None:
                for i in ids:
                    into.append(await t.send(prompts[i % len(prompts)]))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        done += block
    return samples


def auth_markdown(report: dict[str, Any]) -> str:
    lines = []
    if report.get("checks_alone"):
        lines += [
            "The checks alone (principal, reservation, settlement; no HTTP, no model call):",
            "",
            "| variant | rounds | p50 ms | p99 ms |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['variant']} | {r['rounds']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |"
            for r in report["checks_alone"]
        ]
        lines.append("")
    lines += [
        f"Store: {report['store']}; {report['what']}.",
        "",
        "| variant | concurrency | requests | errors | overhead p50 ms | overhead p99 ms "
        "| added p50 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['variant']} | {r['concurrency']} | {r['requests']} | {r['errors']} "
            f"| {r['overhead_p50_ms']:.2f} | {r['overhead_p99_ms']:.2f} "
            f"| {r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["auth_markdown", "run_auth_overhead", "write_auth_report"]
