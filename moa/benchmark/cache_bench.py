"""``moa bench --cache``: what the response cache saves on a workload with repeats and rephrasings.

The workload: MT-Bench first turns (or any prompts file) asked once each (misses: every model call
paid), then each asked again verbatim (exact hits), then the rephrasings in
``moa/data/mt_bench_paraphrases.jsonl`` of the questions that have one (semantic lookups: a hit
when the guard and the threshold let it through). Every request opts into the semantic cache.
The API runs in-process (uvicorn, one process, the SQLite store in a temporary directory), as
``moa serve --local`` does; the simulator runs in its own process with the bench's latency profile.
Latencies are measured by the client over loopback, end to end.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from moa.benchmark.auth_cost import _served
from moa.benchmark.runner import Simulator, bench_config
from moa.benchmark.stats import percentile
from moa.config import CacheConfig, StateConfig


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


async def run_cache_bench(
    prompts_path: Path | None, limit: int, ttft_s: float, tps: float, jitter: float, preset: str = "moa-lite"
) -> dict[str, Any]:
    questions, pairs = _workload(prompts_path, limit)
    sim = Simulator(ttft_s, tps, jitter)
    samples: dict[str, list[dict[str, Any]]] = {"miss": [], "exact": [], "paraphrase": []}
    try:
        with tempfile.TemporaryDirectory(prefix="moa-cache-bench-") as tmp:
            cfg = bench_config(sim.url, 30.0).model_copy(
                update={"cache": CacheConfig(enabled=True, store="sqlite"), "state": StateConfig(dir=tmp)}
            )
            async with _served(cfg, None) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:

                async def ask(text: str, phase: str) -> None:
                    body = {
                        "model": preset,
                        "messages": [{"role": "user", "content": text}],
                        "moa": {"detail": True, "cache_semantic": True},
                    }
                    t0 = time.perf_counter()
                    r = await client.post("/v1/chat/completions", json=body)
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
                        }
                    )

                await ask("warm up the embedder and the connections", "miss")
                samples["miss"].clear()
                sem = asyncio.Semaphore(8)  # misses pay the simulated models: overlap them

                async def bounded(q: str) -> None:
                    async with sem:
                        await ask(q, "miss")

                await asyncio.gather(*(bounded(q) for q in questions))
                for q in questions:  # hits one at a time: their latency is the point
                    await ask(q, "exact")
                for _, para in pairs:
                    await ask(para, "paraphrase")
    finally:
        sim.stop()

    def lat(rows: list[dict[str, Any]]) -> dict[str, float | None]:
        ms = [r["ms"] for r in rows]
        return {
            "n": len(ms),
            "p50_ms": percentile(ms, 50) if ms else None,
            "p95_ms": percentile(ms, 95) if ms else None,
        }

    every = [r for rows in samples.values() for r in rows]
    exact = [r for r in every if r["cache"] == "hit-exact"]
    semantic = [r for r in every if r["cache"] == "hit-semantic"]
    paid = sum(r["cost_usd"] for r in every)
    saved = sum(r["saved_usd"] for r in every)
    return {
        "what": "in-process API (uvicorn), SQLite store, preset "
        + preset
        + ", client-measured over loopback",
        "options": {
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
        "| | requests | p50 ms | p95 ms |",
        "|---|---|---|---|",
    ]
    for kind, row in report["latency"].items():
        lines.append(f"| {kind} | {row['n']} | {f(row['p50_ms'])} | {f(row['p95_ms'])} |")
    hits, para = 100 * report["hit_rate"], 100 * report["paraphrase_hit_rate"]
    lines += [
        "",
        f"hit rate {hits:.0f}% overall; rephrasings served {para:.0f}%; paid ${report['paid_usd']:.4f}, "
        f"saved ${report['saved_usd']:.4f} ({100 * report['saved_share']:.0f}% of what the workload "
        "would have cost).",
    ]
    return "\n".join(lines)


def write_cache_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=1))
    (out / "cache.md").write_text(cache_markdown(report) + "\n")
