"""API keys and budgets on the two-node Ray cluster: an app whose two ingress replicas (one per
node) share one real redis-server. A key revoked with ``moa keys`` is refused by every replica,
and what both replicas charge lands in the one ledger.

Which replica served a request is read from its JSON request line in the replicas' Serve log
files (by the trace id the response carries), so the API tells clients nothing about replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from moa.auth import new_key, new_record
from moa.cli import main
from moa.config import parse_config
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits, KeyRecord, to_micro
from moa.state.redis_store import RedisStore
from tests.helpers import (
    QUESTION,
    RAY_MODULE,
    delete_app,
    model_stats,
    set_fault,
    sim_stats,
    trimmed_config,
    wait_idle,
)
from tests.test_observability import _series_value
from tests.test_serve_claims import _serve_logs
from tests.waiting import wait_until, wait_until_sync

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = RAY_MODULE

APP, PREFIX = "keyed-redis", "/keyed-redis"
BODY = {
    "model": "single",
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 20,
    "moa": {"detail": True},
}
# Requests in flight per ingress replica: small, so a burst overflows the proxy's local replica
# (Serve's proxies prefer one on their own node) and both replicas serve.
PER_REPLICA = 2
# The replicas' key cache time (state.key_cache_s), and the most one burst of /v1/models through
# the proxy may take on a loaded two-CPU machine: revocation must show within their sum.
KEY_CACHE_S, BURST_S = 1.0, 3.0
BURST = 12
# What the aggregator writes before it stalls, in the late-charge test: more than one piece, all
# within one of its replica's 0.1 s batches (the simulator writes 8,000 tokens a second there).
STALL_TOKENS = 40


def _db(redis_url: str) -> str:
    """The session redis-server, in a database no other test uses."""
    return re.sub(r"/\d+$", "/7", redis_url)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_store(redis_url: str, work: Any) -> Any:
    store = RedisStore(redis_url)
    try:
        return await work(store)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def keyed(cluster: dict[str, Any], redis_server: str) -> Iterator[tuple[str, str, KeyRecord, str]]:
    """The app, deployed after its key exists (so no replica ever ran open)."""
    from moa_actors.app import build_from_config

    url = _db(redis_server)
    key = new_key()
    record = new_record("everywhere", key, KeyLimits(budget_usd=5.0, detail=True))

    async def fresh(store: RedisStore) -> None:
        await store.client.flushdb()
        await store.create_key(record)

    _run(_with_store(url, fresh))
    raw = trimmed_config(cluster["config"])
    raw["state"] = {"redis_url": url, "key_cache_s": KEY_CACHE_S}
    raw["serve"]["ingress"] = {
        "num_cpus": 0.05,
        "num_replicas": 2,
        "max_replicas_per_node": 1,
        "max_ongoing_requests": PER_REPLICA,
    }
    raw["server"]["max_concurrent_requests"] = PER_REPLICA
    serve.run(build_from_config(parse_config(raw, "the keyed redis config")), name=APP, route_prefix=PREFIX)
    try:
        yield str(cluster["url"]) + PREFIX, key, record, url
    finally:
        delete_app(APP)


def _ingress_nodes() -> set[str]:
    """The nodes the app's live ingress replicas run on (from the GCS actor table)."""
    actors = ray._private.state.actors(actor_state_name="ALIVE").values()
    return {a["Address"]["NodeID"] for a in actors if f"{APP}#ingress" in (a.get("Name") or "")}


def _burst(url: str, key: str, path: str = "/v1/chat/completions") -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=60) as c:
            if path.endswith("completions"):
                sends = [c.post(url + path, json=BODY) for _ in range(BURST)]
            else:
                sends = [c.get(url + path) for _ in range(BURST)]
            return list(await asyncio.gather(*sends))

    return _run(go())


def _replicas_of(responses: list[httpx.Response]) -> dict[str, int]:
    """Which ingress replica served each response (its log file), once every line is written."""
    wanted = {r.headers["x-moa-trace-id"] for r in responses}

    def lines() -> dict[str, str]:
        found = {}
        for name, text in _serve_logs().items():
            if APP.replace("-", "_") not in name.replace("-", "_") or "ingress" not in name:
                continue
            for line in text.splitlines():
                if line.startswith("{") and '"event": "request"' in line:
                    row = json.loads(line)
                    if row.get("trace_id") in wanted:
                        found[row["trace_id"]] = name
        return found

    served = wait_until_sync(lines, lambda f: len(f) == len(wanted), interval=0.2, what="the request lines")
    counts: dict[str, int] = {}
    for name in served.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_spend_from_both_replicas_lands_in_one_ledger_and_revocation_reaches_every_replica(
    keyed: tuple[str, str, KeyRecord, str],
    sim: SimulatorServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, key, record, redis_url = keyed
    assert len(_ingress_nodes()) == 2  # one ingress replica on each node

    # Both replicas accept the key; keep sending bursts until each has served some of them.
    answered: list[httpx.Response] = []

    def serve_burst() -> dict[str, int]:
        responses = _burst(url, key)
        ok = [r for r in responses if r.status_code == 200]
        # Past a replica's admission cap the answer is a 429 (Serve may queue there instead).
        assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses]
        answered.extend(ok)
        return _replicas_of(answered)

    by_replica = wait_until_sync(
        serve_burst, lambda c: len(c) == 2, interval=0.1, what="both ingress replicas to serve"
    )
    assert all(n > 0 for n in by_replica.values())

    # Every answer's cost, whichever replica charged it, is in the one Redis ledger.
    reported = sum(r.json()["moa"]["totals"]["cost_usd"] for r in answered)
    spent = _run(_with_store(redis_url, lambda s: s.spent(record.id, "total")))
    n = len(answered)
    assert reported > 0 and to_micro(reported) - n <= spent <= to_micro(reported) + n

    # Revoked with `moa keys` against the same Redis, while both replicas hold it in their caches.
    monkeypatch.setenv("MOA_REDIS_URL", redis_url)
    assert main(["keys", "revoke", "everywhere"]) == 0

    def refused_everywhere() -> tuple[bool, int]:
        responses = _burst(url, key, "/v1/models")
        refused = all(
            r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" for r in responses
        )
        return refused, len(_replicas_of(responses)) if refused else 0

    # Until each replica's cached record (state.key_cache_s) expires, some still accept it; then
    # every request of a burst is refused, and the burst reached both replicas: within the cache
    # time plus what one burst (a request on each replica) takes, not within a generic 30 s.
    revoked_at = time.monotonic()
    refused, replicas = wait_until_sync(
        refused_everywhere,
        lambda v: v == (True, 2),
        within_s=KEY_CACHE_S + BURST_S,
        interval=0.1,
        what="every replica to refuse",
    )
    assert time.monotonic() - revoked_at <= KEY_CACHE_S + BURST_S
    assert refused and replicas == 2
    # And it stays refused: N more consecutive requests, all 401.
    later = [httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) for _ in range(20)]
    assert [r.status_code for r in later] == [401] * 20
    assert all("revoked" in r.json()["error"]["message"] for r in later)
    assert key not in "".join(r.text for r in later)


def test_each_keys_requests_spend_tokens_and_refusals_reach_prometheus(
    keyed: tuple[str, str, KeyRecord, str], cluster: dict[str, Any]
) -> None:
    """docs/SECURITY.md's per-key series, scraped from Ray's Prometheus endpoints: a key's requests,
    spend and tokens move as it is used, and a key whose budget cannot hold a request counts a
    refusal. Keys are labelled by name, never by the key itself."""
    url, _, _, redis_url = keyed
    rich, poor = new_key(), new_key()
    records = [
        new_record("metrics-rich", rich, KeyLimits(budget_usd=5.0, detail=True)),
        new_record("metrics-poor", poor, KeyLimits(budget_usd=0.000001, detail=True)),
    ]

    async def create(store: RedisStore) -> None:
        for record in records:
            await store.create_key(record)

    _run(_with_store(redis_url, create))
    for _ in range(3):
        r = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {rich}"})
        assert r.status_code == 200, r.text
    refused = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {poor}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"

    def scrape() -> str:
        ports = cluster["metrics"].values()
        return "\n".join(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in ports)

    def series(text: str, name: str, key: str) -> float:
        """A counter of this app, as Ray exports it (``ray_`` prefix, ``_total`` suffix)."""
        return _series_value(text, f"ray_{name}_total", application=APP, key=key)

    def moved(text: str) -> bool:
        return (
            series(text, "moa_key_requests", "metrics-rich") >= 3
            and series(text, "moa_key_cost_usd", "metrics-rich") > 0
            and series(text, "moa_key_tokens", "metrics-rich") > 0
            and series(text, "moa_key_budget_refusals", "metrics-poor") >= 1
        )

    text = wait_until_sync(scrape, moved, within_s=90, interval=1.0, what="the per-key series to move")
    assert series(text, "moa_key_budget_refusals", "metrics-rich") == 0
    assert rich not in text and poor not in text


def test_a_cut_call_is_charged_what_its_provider_replica_saw_not_less_than_the_invoice(
    keyed: tuple[str, str, KeyRecord, str], cluster: dict[str, Any], sim: SimulatorServer
) -> None:
    """docs/RELIABILITY.md "Spend audit": on Ray the text of a call nobody reads as it comes
    crosses from its provider replica to the ingress in 0.1 s batches (``CallRequest.batch_s``),
    so when the call is cut the ingress has not seen all that the provider wrote (the ledger
    ended 7.2% below the invoice). Here the aggregator of three non-streamed ``moa-lite``
    requests writes 40 tokens at once and stalls (the simulator's ``stall``), so that its replica
    holds all but the first piece in its batch, and the client abandons each request. The
    provider replica saw every token, and nothing is in flight: the key's ledger must come to the
    simulator's invoice and each cut call's margin (``cut_margin_tokens``, for what a replica may
    leave unread), to the micro-dollar of rounding per request: never below the invoice. Before
    the replica left a receipt of what it saw, each cut call was charged about 39 tokens short;
    before the margin applied to the receipt too, a cut call was charged exactly what its replica
    read, which on a busy machine is short of what the provider sent."""
    url, _, _, redis_url = keyed
    set_fault(sim, "gpt-4.1", stall={"rate": 1.0, "after_tokens": STALL_TOKENS})
    key = new_key()
    record = new_record("late-charge", key, KeyLimits(budget_usd=5.0))
    _run(_with_store(redis_url, lambda s: s.create_key(record)))
    body = {"model": "moa-lite", "messages": QUESTION, "max_tokens": 1000}
    cuts = 3

    async def abandon(http: httpx.AsyncClient) -> None:
        call = asyncio.ensure_future(http.post(url + "/v1/chat/completions", json=body))
        await wait_until(
            lambda: asyncio.to_thread(model_stats, sim, "gpt-4.1"),
            lambda s: s["in_flight"] > 0 or call.done(),
            what="the aggregator to start",
        )
        assert not call.done(), call.result().text
        # Its 40 tokens are out in 5 ms (8,000 a second), then it stalls; the second is for a
        # busy replica to read them all.
        await asyncio.sleep(1.0)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await wait_idle(sim)

    async def scenario() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            for _ in range(cuts):
                await abandon(http)

    _run(scenario())
    stats = sim_stats(sim)
    aggregator = stats["gpt-4.1"]
    assert aggregator["faults"] == {"stall": cuts} and aggregator["cancelled"] == cuts
    assert STALL_TOKENS * cuts <= aggregator["billed_output_tokens"] <= (STALL_TOKENS + 2) * cuts
    cfg = cluster["config"]  # the keyed app's prices are the session app's
    billed = to_micro(
        sum(
            cfg.price(provider, model).cost(s["billed_input_tokens"], s["billed_output_tokens"])
            for model, s in stats.items()
            for provider, m in cfg.all_models()
            if m == model
        )
    )
    # Each cut call is charged what its replica saw and its provider's margin for what a replica
    # may leave unread (``cut_margin_tokens``: none here, so exactly the margin above the invoice);
    # each request's settlement rounds up to the micro-dollar.
    agg = cfg.providers["openai"]
    margin = cuts * (to_micro(cfg.price("openai", "gpt-4.1").cost(0, agg.cut_margin_tokens)))
    spent = wait_until_sync(
        lambda: _run(_with_store(redis_url, lambda s: s.spent(record.id, "total"))),
        lambda v: v >= billed + margin - cuts,
        interval=0.1,
        what=f"the key's ledger to come to the invoice and the margin ({billed} + {margin} micro-dollars)",
    )
    assert billed <= spent <= billed + margin + cuts, (spent, billed, margin)


def test_the_openai_batch_flow_through_the_ray_app(
    keyed: tuple[str, str, KeyRecord, str], sim: SimulatorServer
) -> None:
    """The Batch API on the Ray app: two ingress replicas on one Redis, either may take the batch
    (its lease decides which); the official client's flow ends with every request answered once."""
    url, _, _, redis_url = keyed
    key = new_key()
    _run(_with_store(redis_url, lambda s: s.create_key(new_record("batcher", key, KeyLimits()))))
    oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    # BODY without moa.detail, which this key may not ask for; a question of its own per line.
    body = {k: v for k, v in BODY.items() if k != "moa"}
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body | {"messages": [{"role": "user", "content": f"Name colour number {i}."}]},
        }
        for i in range(6)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    src = oai.files.create(file=("in.jsonl", data), purpose="batch")
    batch = oai.batches.create(input_file_id=src.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until_sync(
        lambda: oai.batches.retrieve(batch.id),
        lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
        within_s=120,
        interval=0.5,
        what="the batch to end",
    )
    assert done.status == "completed" and done.request_counts is not None, done
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 0)
    assert done.output_file_id is not None
    answers = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in answers) == [f"q{i}" for i in range(6)]
    assert {x["response"]["status_code"] for x in answers} == {200}
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 6  # each once, by one replica


def test_moa_batch_run_with_address_finds_the_app_on_the_cluster_and_both_nodes_serve(
    cluster: dict[str, Any],
    keyed: tuple[str, str, KeyRecord, str],
    sim: SimulatorServer,
    tmp_path: Path,
) -> None:
    """``moa batch run --address`` in a process of its own: it joins the cluster as a driver, finds
    the app it is told of (the keyed app, whose two ingress replicas run one per node) and sends
    the batch through Serve's proxy, where both nodes' replicas serve it; every item is answered
    once. An app that is not there is refused, naming the moa apps that are."""
    _, _, _, redis_url = keyed
    key = new_key()
    _run(_with_store(redis_url, lambda s: s.create_key(new_record("batch-cli", key, KeyLimits()))))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        "".join(json.dumps({"custom_id": f"q{i}", "prompt": f"Name colour {i}."}) + "\n" for i in range(12))
    )
    address = cluster["address"]
    # Each provider-openai replica's count of background calls, before: the module's Batch API
    # test has sent background calls of its own through the same app.
    handle = serve.get_deployment_handle("provider-openai", app_name=APP)

    def background_calls() -> dict[str, int]:
        running = serve.status().applications[APP].deployments["provider-openai"].replica_states["RUNNING"]
        seen: dict[str, int] = {}

        def ask() -> int:
            health = handle.health.remote().result(timeout_s=30)
            seen[health["replica"]] = health["background_calls"]
            return len(seen)

        wait_until_sync(ask, lambda n: n >= running, interval=0, what="every replica of provider-openai")
        return seen

    before = background_calls()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "moa.cli", "batch", "run", str(src), "--out", str(out), "--no-progress"]
    run += ["--preset", "single", "--concurrency", "8", "--api-key", key, "--address", address]
    done = subprocess.run([*run, "--app", APP], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"the app '{APP}' on the Ray cluster at {address} (2 nodes), at " in done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(12))
    assert {x["response"]["status_code"] for x in lines} == {200}
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 12  # each once
    traced = [SimpleNamespace(headers={"x-moa-trace-id": x["response"]["request_id"]}) for x in lines]
    assert len(_replicas_of(traced)) == 2, "both nodes' ingress replicas serve the batch"  # type: ignore[arg-type]
    # Sent as batch work, each item's call reached its provider replica marked as background.
    after = background_calls()
    assert sum(after.values()) - sum(before.values()) == 12, (before, after)
    missing = subprocess.run([*run, "--app", "nope"], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert f"no moa app named 'nope' on {address} (moa apps: " in missing.stderr and APP in missing.stderr
