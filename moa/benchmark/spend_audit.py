"""``moa bench --spend-audit``: does the ledger match the invoice, and do the limits hold before
the money is spent?

Four scenarios, each with an API key of its own, against one simulator (its own process, whose
``billed_*_tokens`` counters are the providers' invoice) and the API in-process (``moa serve
--local``'s app) or, with ``serve=True``, the Ray Serve app as ``moa serve`` runs it:

- ``ledger``: mixed traffic on a key with room to spare (plain answers, streams the client hangs
  up on after a few chunks, plain requests the client abandons mid-way, streamed staircase
  overrides), a few at a time. The key's ledger against the simulator's invoice, priced alike:
  the goal is never below it, and above it by at most the stated error of the estimate (each cut
  call's ``cut_margin_tokens``, which stand for the tokens in flight when a stream was closed)
  and rounding.
- ``budget``: a burst of concurrent requests (half of them staircase streams) on a small budget.
  Goal: the ledger ends at most one request's projection over the budget.
- ``tpm``: a burst of concurrent requests on a key with a tokens-per-minute limit, inside one
  minute. Goal: the minute's tokens (the invoice) at most one request's projection over the limit.
- ``hog``: one key holds more slow streams than its share of the replica's slots while another
  key asks steadily. Goal: the other key's requests succeed (at least 95%).

Every figure is the simulator's count or the ledger's, not a clock's: the audit passes or fails
the same on a loaded machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from moa.api.access import RECEIPT_GRACE_S
from moa.auth import new_key, new_record
from moa.benchmark.cache_bench import _serving
from moa.benchmark.runner import Simulator, bench_config
from moa.config import MoAConfig, StateConfig
from moa.engine.cost import project
from moa.engine.receipts import RECEIPT_WAIT_S
from moa.state import KeyLimits, from_micro, open_store
from moa.types import ChatMessage, GenerationParams

QUESTION = "How do vaccines train the immune system to recognise a pathogen?"
MAX_TOKENS = 200
# The replica's admission slots in the audit (the bench's own config allows 1024).
SLOTS = 16
# How long the ledger must not move before the audit reads it: a request that cut calls settles
# once their receipts came, or after the longest a settlement waits for them (on Ray).
SETTLED_QUIET_S = RECEIPT_WAIT_S + RECEIPT_GRACE_S + 0.5


def invoice(sim_url: str, cfg: MoAConfig) -> dict[str, Any]:
    """The simulator's invoice since its last reset, priced as the config prices each model."""
    stats = httpx.get(sim_url + "/admin/stats").json()["models"]
    models = {m: p for p, m in cfg.all_models()}
    cost, tokens, cancelled = 0.0, 0, 0
    for model, s in stats.items():
        price = cfg.price(models[model], model)
        cost += price.cost(s["billed_input_tokens"], s["billed_output_tokens"])
        tokens += s["billed_input_tokens"] + s["billed_output_tokens"]
        cancelled += s["cancelled"]
    return {"cost_usd": cost, "tokens": tokens, "cancelled_calls": cancelled}


async def _idle(sim_url: str, http: httpx.AsyncClient) -> None:
    """Until the simulator has no request in flight (each has billed what it generated)."""
    for _ in range(600):
        stats = (await http.get(sim_url + "/admin/stats")).json()["models"]
        if not any(s["in_flight"] for s in stats.values()):
            return
        await asyncio.sleep(0.05)


def _body(preset: str, *, stream: bool = False, aggregation: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": preset,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }
    if aggregation:
        body["moa"] = {"aggregation": aggregation}
    return body


def projection(cfg: MoAConfig, preset: str, aggregation: str | None = None, stream: bool = False) -> Any:
    """What one request of the audit may cost and use at worst, as admission projects it."""
    plan = cfg.presets[preset].as_run(aggregation, stream)  # type: ignore[arg-type]
    messages = [ChatMessage(role="user", content=QUESTION)]
    return project(cfg, plan, messages, GenerationParams(max_tokens=MAX_TOKENS))


class Audit:
    """One audit run: the served API, the simulator, the state store the keys live in."""

    def __init__(self, url: str, sim_url: str, cfg: MoAConfig) -> None:
        self.url, self.sim_url, self.cfg = url, sim_url, cfg
        self.http = httpx.AsyncClient(base_url=url, timeout=120)

    async def key(self, name: str, limits: KeyLimits) -> tuple[str, str]:
        store = open_store(self.cfg.state)
        try:
            key = new_key()
            record = new_record(name, key, limits)
            await store.create_key(record)
            return key, record.id
        finally:
            await store.close()

    async def spent(self, key_id: str) -> int:
        store = open_store(self.cfg.state)
        try:
            return await store.spent(key_id, "total")
        finally:
            await store.close()

    async def reset_sim(self) -> None:
        await _idle(self.sim_url, self.http)
        (await self.http.post(self.sim_url + "/admin/reset", json={})).raise_for_status()

    async def settled(self, key_id: str) -> int:
        """The key's spend once every request settled (its value stops changing for longer than a
        settlement may wait for its cut calls' receipts: ``SETTLED_QUIET_S``)."""
        await _idle(self.sim_url, self.http)
        last, since = -1, time.monotonic()
        while time.monotonic() - since < SETTLED_QUIET_S:
            now = await self.spent(key_id)
            if now != last:
                last, since = now, time.monotonic()
            await asyncio.sleep(0.1)
        return last

    # -- the ways a request goes -------------------------------------------------------------------

    async def plain(self, key: str, preset: str) -> int:
        r = await self.http.post("/v1/chat/completions", json=_body(preset), headers=_auth(key))
        return r.status_code

    async def hang_up(
        self, key: str, preset: str, after_chunks: int = 3, aggregation: str | None = None
    ) -> int:
        body = _body(preset, stream=True, aggregation=aggregation)
        async with self.http.stream("POST", "/v1/chat/completions", json=body, headers=_auth(key)) as r:
            if r.status_code != 200:
                return r.status_code
            chunks = 0
            async for line in r.aiter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    chunks += 1
                    if chunks >= after_chunks:
                        break
            return 200

    async def stream_whole(self, key: str, preset: str, aggregation: str | None = None) -> int:
        body = _body(preset, stream=True, aggregation=aggregation)
        async with self.http.stream("POST", "/v1/chat/completions", json=body, headers=_auth(key)) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code

    async def abandon(self, key: str, preset: str, after_s: float) -> int:
        call = asyncio.ensure_future(self.plain(key, preset))
        done, _ = await asyncio.wait({call}, timeout=after_s)
        if call in done:
            return call.result()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        return 0  # abandoned

    # -- the scenarios -----------------------------------------------------------------------------

    async def ledger(self, rounds: int) -> dict[str, Any]:
        await self.reset_sim()
        key, key_id = await self.key("audit-ledger", KeyLimits(budget_usd=100.0))
        gate = asyncio.Semaphore(4)

        async def one(make: Callable[[], Awaitable[int]]) -> int:
            async with gate:
                return await make()

        work: list[Callable[[], Awaitable[int]]] = []
        for i in range(rounds):
            preset = ("single", "moa-lite")[i % 2]
            work += [
                partial(self.plain, key, preset),
                partial(self.hang_up, key, preset),
                partial(self.abandon, key, "moa-lite", 1.5 + 0.3 * (i % 3)),
                partial(self.stream_whole, key, "moa", "staircase"),
                partial(self.hang_up, key, "moa", 6, "staircase"),
            ]
        statuses = await asyncio.gather(*(one(w) for w in work))
        spent = await self.settled(key_id)
        bill = invoice(self.sim_url, self.cfg)
        ledger_usd = from_micro(spent)
        # The stated error: per call the service cut, its provider's margin for the output tokens in
        # flight (``cut_margin_tokens``), at the dearest output price of the models that ran.
        margin = max(
            self.cfg.providers[p].cut_margin_tokens * self.cfg.price(p, m).output_per_mtok / 1e6
            for p, m in self.cfg.all_models()
        )
        allowed_above = bill["cancelled_calls"] * margin + 1e-6 * len(work)
        return {
            "requests": len(work),
            "statuses": _count(statuses),
            "ledger_usd": ledger_usd,
            "invoice_usd": bill["cost_usd"],
            "invoice_tokens": bill["tokens"],
            "calls_cut": bill["cancelled_calls"],
            "difference_usd": ledger_usd - bill["cost_usd"],
            "allowed_above_usd": allowed_above,
            "met": 0 <= ledger_usd - bill["cost_usd"] <= allowed_above,
        }

    async def budget(self, burst: int) -> dict[str, Any]:
        await self.reset_sim()
        kinds = [("moa-lite", None), ("moa", "staircase")]
        worst = max(projection(self.cfg, p, a, stream=a is not None).cost_usd for p, a in kinds)
        # Room for three worst cases at once: the burst drives the spend up to the budget, as
        # settled requests (which cost far less than their projection) free room for more.
        budget = round(3 * worst, 4)
        key, key_id = await self.key("audit-budget", KeyLimits(budget_usd=budget))
        calls = [
            self.stream_whole(key, "moa", "staircase") if i % 2 else self.plain(key, "moa-lite")
            for i in range(burst)
        ]
        statuses = await asyncio.gather(*calls)
        spent = from_micro(await self.settled(key_id))
        return {
            "budget_usd": budget,
            "requests": burst,
            "statuses": _count(statuses),
            "spent_usd": spent,
            "overspend_usd": max(0.0, spent - budget),
            "one_projection_usd": worst,
            "met": spent - budget <= worst,
        }

    async def tpm(self, burst: int) -> dict[str, Any]:
        await self.reset_sim()
        one = projection(self.cfg, "moa-lite").tokens
        limit = 3 * one  # room for a few requests, far fewer than the burst
        key, _ = await self.key("audit-tpm", KeyLimits(tpm=limit))
        # Inside one minute: start early in it, so the burst's admissions share its count.
        into = time.time() % 60
        if into > 30:
            await asyncio.sleep(60.5 - into)
        statuses = await asyncio.gather(*(self.plain(key, "moa-lite") for _ in range(burst)))
        await _idle(self.sim_url, self.http)
        used = invoice(self.sim_url, self.cfg)["tokens"]
        return {
            "tpm": limit,
            "requests": burst,
            "statuses": _count(statuses),
            "tokens_in_the_minute": used,
            "one_projection_tokens": one,
            "met": used <= limit + one,
        }

    async def hog(self, streams: int, asks: int) -> dict[str, Any]:
        await self.reset_sim()
        hog_key, _ = await self.key("audit-hog", KeyLimits())
        other_key, _ = await self.key("audit-other", KeyLimits())
        held = [asyncio.ensure_future(self.stream_whole(hog_key, "moa")) for _ in range(streams)]
        await asyncio.sleep(1.0)  # the hog's streams hold their slots
        gate = asyncio.Semaphore(2)

        async def ask() -> int:
            async with gate:
                return await self.plain(other_key, "single")

        other = await asyncio.gather(*(ask() for _ in range(asks)))
        hog_statuses = await asyncio.gather(*held)
        ok = sum(s == 200 for s in other)
        return {
            "slots": SLOTS,
            "hog_streams": streams,
            "hog_statuses": _count(hog_statuses),
            "other_requests": asks,
            "other_statuses": _count(other),
            "other_success_rate": ok / asks,
            "met": ok / asks >= 0.95,
        }


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _count(statuses: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        name = "abandoned" if s == 0 else str(s)
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def audit_config(sim_url: str, state_dir: str) -> MoAConfig:
    """The bench's config with a replica's usual slots, the state in ``state_dir``, no cache (a
    hit costs nothing and would hide what is being counted)."""
    cfg = bench_config(sim_url, 30.0)
    server = cfg.server.model_copy(update={"max_concurrent_requests": SLOTS})
    return cfg.model_copy(update={"server": server, "state": StateConfig(dir=state_dir)})


async def run_spend_audit(
    *, serve: bool = False, rounds: int = 4, burst: int = 16, ttft_s: float = 0.1, tps: float = 80.0
) -> dict[str, Any]:
    """Run the four scenarios; each figure with whether it met its goal."""
    sim = Simulator(ttft_s, tps, 0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="moa-spend-audit-") as tmp:
            cfg = audit_config(sim.url, tmp)
            async with _serving(cfg, serve, True) as (url, _):
                audit = Audit(url, sim.url, cfg)
                # Until a key exists the service runs open: make one before any request.
                await audit.key("audit-first", KeyLimits())
                try:
                    report: dict[str, Any] = {
                        "where": "Ray Serve app" if serve else "in-process API",
                        "profile": {"ttft_s": ttft_s, "tokens_per_s": tps, "max_tokens": MAX_TOKENS},
                        "ledger": await audit.ledger(rounds),
                        "budget": await audit.budget(burst),
                        "tpm": await audit.tpm(burst),
                        "hog": await audit.hog(SLOTS, 2 * burst),
                    }
                finally:
                    await audit.http.aclose()
    finally:
        sim.stop()
    report["met"] = all(report[k]["met"] for k in ("ledger", "budget", "tpm", "hog"))
    return report


def audit_markdown(report: dict[str, Any]) -> str:
    led, bud, tpm, hog = report["ledger"], report["budget"], report["tpm"], report["hog"]

    def ok(part: dict[str, Any]) -> str:
        return "met" if part["met"] else "**missed**"

    rows = [
        f"Spend audit, {report['where']}:",
        "",
        "| check | figure | goal | |",
        "|---|---|---|---|",
        f"| ledger vs invoice ({led['requests']} requests, {led['calls_cut']} calls cut) | "
        f"${led['ledger_usd']:.6f} vs ${led['invoice_usd']:.6f} ({led['difference_usd']:+.6f}) | "
        f"never below, at most ${led['allowed_above_usd']:.6f} above | {ok(led)} |",
        f"| budget ${bud['budget_usd']:g}, burst of {bud['requests']} | spent ${bud['spent_usd']:.4f}, "
        f"over by ${bud['overspend_usd']:.4f} | at most one projection (${bud['one_projection_usd']:.4f}) "
        f"| {ok(bud)} |",
        f"| TPM {tpm['tpm']}, burst of {tpm['requests']} | {tpm['tokens_in_the_minute']} tokens in the "
        f"minute | at most one projection over ({tpm['one_projection_tokens']}) | {ok(tpm)} |",
        f"| a hog's {hog['hog_streams']} streams on {hog['slots']} slots | the other key: "
        f"{hog['other_success_rate']:.0%} of {hog['other_requests']} answered | at least 95% | {ok(hog)} |",
    ]
    return "\n".join(rows)


def write_audit_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spend-audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "spend-audit.md").write_text(audit_markdown(report) + "\n")
