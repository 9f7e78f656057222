"""``moa bench --cache``: what the response cache saves on a workload with repeats and rephrasings.

The workload: MT-Bench first turns (or any prompts file) asked once each (misses: every model call
paid), then each asked again verbatim (exact hits), then the rephrasings in
``moa/data/mt_bench_paraphrases.jsonl`` of the questions that have one (semantic lookups: a hit
when the guard and the threshold let it through). Every request opts into the semantic cache.
The API runs in-process (uvicorn, one process, the SQLite store in a temporary directory), as
``moa serve --local`` does, or with ``serve=True`` as the Ray Serve app (``moa_actors.cache_bench``:
Serve's HTTP proxy, then an ingress replica), as ``moa serve`` does; the simulator runs in its own
process with the bench's latency profile. Latencies are measured by the client over loopback, end
to end; each hit's engine time (``moa.detail`` ``wall_time_s``: from the engine's start to the
answer out of the cache) says how much of it the service's own lookup is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from moa.auth import new_key, new_record
from moa.benchmark.auth_cost import _served
from moa.benchmark.runner import Simulator, bench_config, ray_targets
from moa.benchmark.stats import percentile
from moa.config import CacheConfig, MoAConfig, StateConfig
from moa.state import KeyLimits, open_store

# Timed requests per row of the Serve floor (after 20 uncounted).
FLOOR_REQUESTS = 200


def _workload(prompts_path: Path | None, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(questions, [(question, its rephrasing)])."""
    if prompts_path is not None:
        rows = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    else:
        rows = [
            json.loads(x)
            for x in resources.files("moa").joinpath("data/bench_prompts.jsonl").read_text().splitlines()
            if x.strip()
        ]
    by_id = {
        r.get("question_id", f"#{i}"): (r["prompt"] if "prompt" in r else r["turns"][0])
        for i, r in enumerate(rows)
    }
    questions = list(by_id.values())[:limit]
    paraphrases = [
        json.loads(x)
        for x in resources.files("moa").joinpath("data/mt_bench_paraphrases.jsonl").read_text().splitlines()
        if x.strip()
    ]
    pairs = [(by_id[p["question_id"]], p["paraphrase"]) for p in paraphrases if p["question_id"] in by_id]
    for original, _ in pairs:
        if original not in questions:
            questions.append(original)
    return questions, pairs


@contextlib.asynccontextmanager
async def _serving(cfg: MoAConfig, serve: bool, keyed: bool) -> AsyncIterator[tuple[str, str | None]]:
    """The API under test: its base URL, and the ingress replica's own URL when there is one
    (Serve's direct ingress). The Ray side (``moa_actors.cache_bench``) is found by entry point: the
    core never imports Ray. ``keyed``: the API checks keys against the state store (the Serve app
    always has one)."""
    if not serve:
        async with _served(cfg, open_store(cfg.state) if keyed else None) as url:
            yield url, None
        return
    async with ray_targets("ray_cache").served_on_ray(cfg) as app:
        yield app.url, app.direct_url


def _body(preset: str, text: str) -> dict[str, Any]:
    return {
        "model": preset,
        "messages": [{"role": "user", "content": text}],
        "moa": {"detail": True, "cache_semantic": True},
    }


async def run_cache_bench(
    prompts_path: Path | None,
    limit: int,
    ttft_s: float,
    tps: float,
    jitter: float,
    preset: str = "moa-lite",
    *,
    serve: bool = False,
    rounds: int = 1,
    key_budget_usd: float | None = None,
) -> dict[str, Any]:
    """``rounds`` times the verbatim repeats: enough exact hits for a median worth reporting. With
    ``serve``, the repeats are then asked again through the ingress replica's own port (direct
    ingress, past Serve's proxy), and a bare Serve app gives the floor of the same requests.
    ``key_budget_usd``: every request carries an API key with this budget (the service is then no
    longer open: keys are checked, and spend reserved and settled, as in production)."""
    questions, pairs = _workload(prompts_path, limit)
    load_at_start = list(os.getloadavg())
    sim = Simulator(ttft_s, tps, jitter)
    samples: dict[str, list[dict[str, Any]]] = {"miss": [], "exact": [], "paraphrase": [], "direct": []}
    floor: list[dict[str, Any]] = []
    direct_url: str | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="moa-cache-bench-") as tmp:
            cfg = bench_config(sim.url, 30.0).model_copy(
                update={"cache": CacheConfig(enabled=True, store="sqlite"), "state": StateConfig(dir=tmp)}
            )
            headers = {}
            if key_budget_usd is not None:
                store = open_store(cfg.state)
                api_key = new_key()
                limits = KeyLimits(budget_usd=key_budget_usd, detail=True)
                await store.create_key(new_record("cache-bench", api_key, limits))
                await store.close()
                headers["Authorization"] = f"Bearer {api_key}"
            async with (
                _serving(cfg, serve, key_budget_usd is not None) as (url, direct_url),
                httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client,
                httpx.AsyncClient(base_url=direct_url or url, timeout=120, headers=headers) as direct,
            ):

                async def ask(text: str, phase: str) -> None:
                    t0 = time.perf_counter()
                    r = await (direct if phase == "direct" else client).post(
                        "/v1/chat/completions", json=_body(preset, text)
                    )
                    ms = 1000 * (time.perf_counter() - t0)
                    r.raise_for_status()
                    detail = r.json()["moa"]
                    samples[phase].append(
                        {
                            "ms": ms,
                            "cache": r.headers["x-moa-cache"],
                            "cost_usd": detail["totals"]["cost_usd"],
                            "saved_usd": detail["cache"]["saved_cost_usd"],
                            "similarity": detail["cache"]["similarity"],
                            "engine_ms": 1000 * detail["totals"]["wall_time_s"],
                        }
                    )

                await ask("warm up the embedder and the connections", "miss")
                samples["miss"].clear()
                sem = asyncio.Semaphore(8)  # misses pay the simulated models: overlap them

                async def bounded(q: str) -> None:
                    async with sem:
                        await ask(q, "miss")

                await asyncio.gather(*(bounded(q) for q in questions))
                for _ in range(rounds):
                    for q in questions:  # hits one at a time: their latency is the point
                        await ask(q, "exact")
                for _, para in pairs:
                    await ask(para, "paraphrase")
                if direct_url is not None:
                    for q in questions[:3]:  # warm-up of the direct connection
                        await ask(q, "direct")
                    samples["direct"].clear()
                    for _ in range(rounds):
                        for q in questions:
                            await ask(q, "direct")
                if serve:
                    floor = await ray_targets("ray_cache").measure_floor(
                        url, direct_url, _body(preset, questions[0]), FLOOR_REQUESTS
                    )
    finally:
        sim.stop()

    def lat(rows: list[dict[str, Any]]) -> dict[str, float | None]:
        ms = [r["ms"] for r in rows]
        engine = [r["engine_ms"] for r in rows]
        return {
            "n": len(ms),
            "p50_ms": percentile(ms, 50) if ms else None,
            "p95_ms": percentile(ms, 95) if ms else None,
            "engine_p50_ms": percentile(engine, 50) if engine else None,
        }

    # The direct-ingress repeats are the same hits by another way in: reported apart.
    every = [r for phase, rows in samples.items() if phase != "direct" for r in rows]
    exact = [r for r in every if r["cache"] == "hit-exact"]
    semantic = [r for r in every if r["cache"] == "hit-semantic"]
    paid = sum(r["cost_usd"] for r in every)
    saved = sum(r["saved_usd"] for r in every)
    where = "Ray Serve app (HTTP proxy, one ingress replica)" if serve else "in-process API (uvicorn)"
    if key_budget_usd is not None:
        where += f", an API key with a ${key_budget_usd:g} budget"
    return {
        "what": f"{where}, SQLite store, preset {preset}, client-measured over loopback",
        "loadavg": {"start": load_at_start, "end": list(os.getloadavg())},
        "options": {
            "serve": serve,
            "rounds": rounds,
            "key_budget_usd": key_budget_usd,
            "ttft_s": ttft_s,
            "tokens_per_s": tps,
            "jitter": jitter,
            "questions": len(questions),
            "paraphrases": len(pairs),
        },
        "requests": len(every),
        "hit_rate": (len(exact) + len(semantic)) / len(every),
        "paraphrase_hit_rate": sum(r["cache"] == "hit-semantic" for r in samples["paraphrase"])
        / max(len(pairs), 1),
        "latency": {
            "miss": lat([r for r in every if r["cache"] == "miss"]),
            "hit-exact": lat(exact),
            "hit-semantic": lat(semantic),
        },
        # Only exact hits count (a wrong port, another service's, would answer misses).
        "latency_direct_ingress": {
            **lat([r for r in samples["direct"] if r["cache"] == "hit-exact"]),
            "not_hits": sum(r["cache"] != "hit-exact" for r in samples["direct"]),
        }
        if samples["direct"]
        else None,
        "floor": floor,
        "paid_usd": paid,
        "saved_usd": saved,
        "saved_share": saved / (paid + saved) if paid + saved else 0.0,
        "semantic_similarities": sorted(r["similarity"] for r in semantic),
    }


def cache_markdown(report: dict[str, Any]) -> str:
    o = report["options"]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [
        f"{report['what']}; simulator ttft {o['ttft_s']} s, {o['tokens_per_s']:g} tokens/s, "
        f"jitter {o['jitter']}.",
        f"{o['questions']} questions asked, then repeated, then {o['paraphrases']} rephrasings: "
        f"{report['requests']} requests.",
        "",
        "| | requests | p50 ms | p95 ms | engine p50 ms |",
        "|---|---|---|---|---|",
    ]
    for kind, row in report["latency"].items():
        engine = f(row.get("engine_p50_ms"))
        lines.append(f"| {kind} | {row['n']} | {f(row['p50_ms'])} | {f(row['p95_ms'])} | {engine} |")
    row = report.get("latency_direct_ingress")
    if row:
        engine = f(row["engine_p50_ms"])
        lines.append(
            f"| hit-exact, direct to the ingress replica's port | {row['n']} | {f(row['p50_ms'])} "
            f"| {f(row['p95_ms'])} | {engine} |"
        )
    if report.get("floor"):
        lines += ["", "| Serve floor (bare app, same body, concurrency 1) | requests | p50 ms | p95 ms |"]
        lines.append("|---|---|---|---|")
        for r in report["floor"]:
            lines.append(
                f"| {r['request']} via {r['via']} | {r['n']} | {f(r['p50_ms'])} | {f(r['p95_ms'])} |"
            )
    hits, para = 100 * report["hit_rate"], 100 * report["paraphrase_hit_rate"]
    lines += [
        "",
        f"hit rate {hits:.0f}% overall; rephrasings served {para:.0f}%; paid ${report['paid_usd']:.4f}, "
        f"saved ${report['saved_usd']:.4f} ({100 * report['saved_share']:.0f}% of what the workload "
        "would have cost).",
    ]
    if "loadavg" in report:
        start, end = (", ".join(f"{x:.2f}" for x in report["loadavg"][k]) for k in ("start", "end"))
        lines.append(f"Load average (1, 5, 15 min): {start} at the start, {end} at the end.")
    return "\n".join(lines)


def write_cache_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=1))
    (out / "cache.md").write_text(cache_markdown(report) + "\n")
