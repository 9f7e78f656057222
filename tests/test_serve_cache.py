"""The response cache on the two-node Ray cluster: two ingress replicas, one per node (two apps
whose ingresses are pinned to the head and to the worker), sharing one real redis-server. Proposer
calls cached by the head's replica are served to the worker's, and so is the final answer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from moa.cache.redis_store import RedisCacheStore
from moa.config import parse_config
from moa.simulator.server import SimulatorServer
from tests.conftest import ON_HEAD, ON_WORKER
from tests.helpers import RAY_MODULE, delete_app, sim_total_requests, trimmed_config
from tests.test_observability import _series_value
from tests.waiting import wait_until_sync

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = RAY_MODULE

APPS = {"cache-head": ON_HEAD, "cache-worker": ON_WORKER}
QUESTION = "What makes a cache key complete?"


def _plan(aggregator: str) -> dict[str, Any]:
    """Three proposers and ``aggregator``, all of openai: the apps' one provider."""
    proposers = [
        {"provider": "openai", "model": "gpt-4.1-mini"},
        {"provider": "openai", "model": "gpt-4o-mini"},
        {"provider": "openai", "model": "gpt-4.1"},
    ]
    return {
        "layers": [{"proposers": proposers, "quorum": 3}],
        "aggregators": [{"provider": "openai", "model": aggregator}],
    }


@pytest.fixture(scope="module")
def apps(cluster: dict[str, Any], redis_server: str) -> Iterator[dict[str, str]]:
    from moa_actors.app import build_from_config

    url = re.sub(r"/\d+$", "/8", redis_server)  # a database no other test uses

    async def wipe() -> None:
        store = RedisCacheStore(url, 1 << 20, 60)
        await store.client.flushdb()
        await store.close()

    asyncio.run(wipe())
    targets = []
    for name, placement in APPS.items():
        raw = trimmed_config(cluster["config"], ("openai",))
        raw["cache"] = {"enabled": True, "store": "redis", "redis_url": url}
        raw["serve"]["ingress"] = {"num_cpus": 0.05, "num_replicas": 1, **placement}
        app = build_from_config(parse_config(raw, f"the {name} config"))
        targets.append(serve.RunTarget(app, name=name, route_prefix=f"/{name}"))
    # Both at once: the two apps' replicas start side by side; the call returns once both run.
    serve.run_many(targets)
    urls = {name: str(cluster["url"]) + f"/{name}" for name in APPS}
    try:
        yield urls
    finally:
        for name in APPS:
            delete_app(name)


def _ingress_node(app: str) -> str:
    actors = ray._private.state.actors(actor_state_name="ALIVE").values()
    nodes = {a["Address"]["NodeID"] for a in actors if f"{app}#ingress" in (a.get("Name") or "")}
    assert len(nodes) == 1
    return nodes.pop()


def _moa(url: str, aggregator: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": QUESTION}], "plan": _plan(aggregator)}
    r = httpx.post(url + "/v1/moa", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_a_proposal_cached_by_one_replica_is_served_to_another_node(
    apps: dict[str, str], cluster: dict[str, Any]
) -> None:
    assert _ingress_node("cache-worker") == cluster["worker_node"]
    assert _ingress_node("cache-head") != cluster["worker_node"]
    first = _moa(apps["cache-head"], "gpt-4.1")
    assert first.headers["x-moa-cache"] == "miss"
    assert first.json()["cache"]["proposals_from_cache"] == 0
    # The worker node's replica: another aggregator, so another final answer, the same proposals.
    other = _moa(apps["cache-worker"], "gpt-4.1-mini")
    assert other.headers["x-moa-cache"] == "miss"
    body = other.json()
    assert body["cache"]["proposals_from_cache"] == 3
    assert {c["cache"] for c in body["calls"] if c["stage"] == "proposer"} == {"exact"}
    # And the head's final answer, from the worker's replica.
    again = _moa(apps["cache-worker"], "gpt-4.1")
    assert again.headers["x-moa-cache"] == "hit-exact"
    assert again.json()["text"] == first.json()["text"]
    # docs/OBSERVABILITY.md's cache series moved, in the worker's app, by what it served and stored.
    worker = {"application": "cache-worker"}
    expected = {
        "ray_moa_cache_hits_total": ({"cache": "proposal", "kind": "exact"}, 3),
        "ray_moa_cache_saved_usd_total": ({"cache": "final", "kind": "exact"}, None),
        "ray_moa_cache_misses_total": ({"cache": "final"}, 1),
        "ray_moa_cache_stored_bytes_total": ({"cache": "final"}, None),
    }

    def scrape() -> dict[str, float]:
        text = "\n".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for port in cluster["metrics"].values()
        )
        return {name: _series_value(text, name, **worker, **tags) for name, (tags, _) in expected.items()}

    values = wait_until_sync(
        scrape, lambda v: all(v.values()), within_s=120, interval=1, what="the cache series"
    )
    for name, (_, count) in expected.items():
        if count is not None:
            assert values[name] == count, name
    assert values["ray_moa_cache_saved_usd_total"] == pytest.approx(first.json()["cost_usd"], rel=1e-3)


def test_exact_hit_latency_through_the_serve_ingress(apps: dict[str, str], sim: SimulatorServer) -> None:
    """An exact hit through Serve's HTTP proxy and the worker node's ingress replica (the answer
    from the replica's LRU): timed by the client over loopback, printed for docs/CACHING.md (the
    figure is the benchmark's, `moa bench --cache --serve`, not a bound here). What is asserted is
    what makes a hit cheap: the thirty hits reached no model at all."""
    import statistics
    import time

    url = apps["cache-worker"] + "/v1/chat/completions"
    body = {"model": "single", "messages": [{"role": "user", "content": "Time a cached answer."}]}
    with httpx.Client(timeout=60) as client:
        assert client.post(url, json=body).headers["x-moa-cache"] in ("miss", "hit-exact")
        calls_before = sim_total_requests(sim)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            r = client.post(url, json=body)
            times.append(1000 * (time.perf_counter() - t0))
            assert r.headers["x-moa-cache"] == "hit-exact"
    p50 = statistics.median(times)
    print(f"exact hit through Serve: p50 {p50:.1f} ms, max {max(times):.1f} ms over {len(times)}")
    assert sim_total_requests(sim) == calls_before
