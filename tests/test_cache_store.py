"""The cache's stores, each against the real thing: the in-process LRU, a SQLite file, redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from moa.cache.cache import open_cache, open_shared_store
from moa.cache.keys import anchors, final_key, normalise_text
from moa.cache.redis_store import RedisCacheStore
from moa.cache.sqlite_store import SQLiteCacheStore
from moa.cache.store import CLEAR_CHECK_S, CacheStore, MemoryStore, TieredStore
from moa.config import CacheConfig, StateConfig, load_config
from moa.plan import AggregatorSpec, Plan
from moa.types import ChatMessage, GenerationParams

Factory = Callable[[int], CacheStore]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """A factory of stores of one kind sharing their backing (a file, a server), bounded by bytes."""
    made: list[CacheStore] = []

    def make(max_bytes: int) -> CacheStore:
        store: CacheStore
        if request.param == "memory":
            store = MemoryStore(max_bytes)
        elif request.param == "sqlite":
            store = SQLiteCacheStore(tmp_path / "cache.db", max_bytes)
        else:
            url = request.getfixturevalue("redis_server")
            # Database 3 of the session's server: the state tests use 0, and each test clears it.
            store = RedisCacheStore(url.rsplit("/", 1)[0] + "/3", max_bytes, ttl_s=60)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.clear(None)
        await store.close()


async def test_put_get_and_ttl(make_store: Factory) -> None:
    store = make_store(1 << 20)
    await store.put("s|f|a", b"answer", 60)
    await store.put("s|f|short", b"gone soon", 0.2)
    assert await store.get("s|f|a") == b"answer"
    assert await store.get("s|f|nothing") is None
    await asyncio.sleep(0.4)
    assert await store.get("s|f|short") is None
    assert await store.get("s|f|a") == b"answer"


async def test_bounded_by_bytes_oldest_first(make_store: Factory) -> None:
    store = make_store(2500)
    for i in range(5):
        await store.put(f"s|f|{i}", bytes([i]) * 1000, 60)
        await asyncio.sleep(0.01)  # distinct write times
    kept = [i for i in range(5) if await store.get(f"s|f|{i}") is not None]
    assert kept == [3, 4]
    stats = await store.stats()
    assert stats.entries == 2 and stats.bytes == 2000


async def test_clear_one_scope_only(make_store: Factory) -> None:
    store = make_store(1 << 20)
    await store.put("key:a|f|1", b"a's", 60)
    await store.put("key:b|f|1", b"b's", 60)
    await store.index_add("key:a|s|ctx", "1", b"vec", 60, 8)
    assert await store.clear("key:a") == 1
    assert await store.get("key:a|f|1") is None
    assert await store.index_read("key:a|s|ctx") == {}
    assert await store.get("key:b|f|1") == b"b's"


async def test_index_keeps_the_newest(make_store: Factory) -> None:
    store = make_store(1 << 20)
    for i in range(5):
        await store.index_add("s|s|ctx", f"m{i}", f"p{i}".encode(), 60, 3)
        await asyncio.sleep(0.01)
    assert await store.index_read("s|s|ctx") == {"m2": b"p2", "m3": b"p3", "m4": b"p4"}
    assert await store.index_read("s|s|other") == {}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_entries_survive_a_restart(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A new store on the same file or server (a restarted replica) sees what the old one wrote."""

    def open_one() -> CacheStore:
        if kind == "sqlite":
            return SQLiteCacheStore(tmp_path / "cache.db", 1 << 20)
        url = request.getfixturevalue("redis_server")
        return RedisCacheStore(url.rsplit("/", 1)[0] + "/4", 1 << 20, ttl_s=60)

    first = open_one()
    await first.put("s|f|k", b"kept", 60)
    await first.close()
    second = open_one()
    try:
        assert await second.get("s|f|k") == b"kept"
    finally:
        await second.clear(None)
        await second.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_clear_reaches_every_replicas_lru(
    kind: str, state_dir: Path, request: pytest.FixtureRequest
) -> None:
    """docs/CACHING.md: ``moa cache clear`` reaches every replica's LRU within CLEAR_CHECK_S. Two
    caches as the service opens them (two replicas) over one SQLite file or one redis-server:
    one wrote an answer (into its own LRU for the whole TTL), the other read it (copied into its
    LRU); the clear goes through a third handle on the store, as the CLI's does."""
    extra: dict[str, Any] = {"store": kind}
    if kind == "redis":
        extra["redis_url"] = request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/7"
    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={
            "cache": CacheConfig(enabled=True, **extra),
            "state": StateConfig(dir=str(state_dir)),
        }
    )
    one, two = open_cache(cfg), open_cache(cfg)
    cli = open_shared_store(cfg)
    assert one is not None and two is not None and cli is not None
    try:
        await cli.clear(None)  # the session's redis-server may hold an earlier test's entries
        await asyncio.sleep(CLEAR_CHECK_S)
        await one.store.put("key:a|f|1", b"a's answer", 3600)
        await one.store.put("key:b|f|1", b"b's answer", 3600)
        assert await two.store.get("key:a|f|1") == b"a's answer"  # now in two's LRU too
        assert await cli.clear("key:a") == 1
        await asyncio.sleep(CLEAR_CHECK_S + 0.05)
        for cache in (one, two):
            assert await cache.store.get("key:a|f|1") is None
        assert await two.store.get("key:b|f|1") == b"b's answer"  # another scope: still there
        # A new entry after the clear is cached and served as before.
        await two.store.put("key:a|f|1", b"a's new answer", 3600)
        assert await one.store.get("key:a|f|1") == b"a's new answer"
    finally:
        await cli.clear(None)
        for closing in (one, two):
            await closing.close()
        await cli.close()


async def test_the_lru_keeps_serving_when_the_generation_cannot_be_read(tmp_path: Path) -> None:
    """A shared store that fails makes misses, never errors, and the LRU goes on serving."""
    shared = SQLiteCacheStore(tmp_path / "cache.db", 1 << 20)
    replica = TieredStore(MemoryStore(1 << 20), shared, check_s=0.0)
    await replica.put("s|f|k", b"kept", 60)

    async def broken() -> int:
        raise OSError("the store is down")

    shared.generation = broken  # type: ignore[method-assign]
    assert await replica.get("s|f|k") == b"kept"
    await shared.close()


async def test_tiered_reads_fill_the_local_lru(tmp_path: Path) -> None:
    shared = SQLiteCacheStore(tmp_path / "cache.db", 1 << 20)
    writer = TieredStore(MemoryStore(1 << 20), shared)
    reader_lru = MemoryStore(1 << 20)
    reader = TieredStore(reader_lru, shared)
    await writer.put("s|p|x", b"proposal", 60)
    assert await reader_lru.get("s|p|x") is None
    assert await reader.get("s|p|x") == b"proposal"  # from the shared store
    assert await reader_lru.get("s|p|x") == b"proposal"  # and now in this replica's LRU
    await shared.close()


def test_keys_normalise_what_no_model_sees_and_keep_the_rest() -> None:
    plan = Plan(aggregators=(AggregatorSpec(provider="openai", model="gpt-4.1"),))
    other = Plan(aggregators=(AggregatorSpec(provider="openai", model="gpt-4.1-mini"),))
    params = GenerationParams()

    def key(text: str, p: Plan = plan, g: GenerationParams = params, scope: str = "open") -> str:
        return final_key(scope, [ChatMessage(role="user", content=text)], p, g)

    assert key("Why is the sky blue?") == key("Why is the sky blue?  \r\n")
    assert normalise_text("def f():\r\n    return 1  \n") == "def f():\n    return 1"
    assert key("Why is the sky blue?") != key("why is the sky blue?")
    assert key("Q") != key("Q", p=other)  # the aggregator chain is part of the key
    assert key("Q") != key("Q", g=GenerationParams(max_tokens=10))
    assert key("Q") != key("Q", scope="key:alice")


def test_anchors_tell_near_misses_apart() -> None:
    assert anchors("Is 17 a prime number?") != anchors("Is 21 a prime number?")
    assert anchors("What is the capital of France?") == anchors("Which city is the capital of France?")
    assert anchors("What is the capital of France?") != anchors("What is the capital of Germany?")
    assert anchors("Should I use Redis here?") != anchors("Should I not use Redis here?")
    assert anchors("Write a haiku about autumn") == anchors("Compose a haiku on the theme of autumn")


def test_the_guard_separates_rephrasings_from_near_misses() -> None:
    from moa.cache.keys import guard

    assert guard("How does a hash map handle collisions?") == guard(
        "How are collisions handled in a hash map?"
    )
    assert guard("What causes inflation?") == guard("What are the causes of inflation?")
    assert guard("Convert 100 Fahrenheit to Celsius.") != guard("Convert 100 Celsius to Fahrenheit.")
    assert guard("What are the advantages of remote work?") != guard(
        "What are the disadvantages of remote work?"
    )
    assert guard("How do I make a cake without eggs?") != guard("How do I make a cake with eggs?")


def test_the_threshold_study_measures_the_default() -> None:
    """The study's guarded rows hold for the shipped pairs: no wrong hit at the default threshold."""
    from moa.benchmark.cache_study import study
    from moa.config import SemanticCacheConfig

    default = SemanticCacheConfig().threshold
    for name in ("cache_pairs.jsonl", "cache_pairs_heldout.jsonl"):
        results = study(name)
        static = next(v for k, v in results["embedders"].items() if k.startswith("static"))
        rows = next(v for k, v in static.items() if "content words" in k)
        row = next(r for r in rows if r["threshold"] == default)
        assert row["wrong_hits"] == 0 and row["hit_rate"] > 0.3, (name, row)


@pytest.mark.parametrize(
    ("provider", "model", "dims"),
    [("openai", "text-embedding-3-small", 1536), ("gemini", "gemini-embedding-001", 3072)],
)
async def test_provider_embeddings_through_the_official_sdks(
    config: Any, sim: Any, provider: str, model: str, dims: int
) -> None:
    """The embedder speaks each provider's embedding API with its SDK; the simulator answers in
    the API's shapes (OpenAI's SDK asks for base64 by default and decodes it)."""
    import httpx

    from moa.cache.embed import ProviderEmbedder, cosine

    embedder = ProviderEmbedder(config, provider, model)
    a, b, c = await embedder.embed(["How do hash maps work?", "How do hash maps work", "Bake bread"])
    assert len(a) == dims
    assert cosine(a, b) > 0.9 > cosine(a, c)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{sim.url}/admin/stats")).json()["embedding_requests"] == 1
    import openai
    from google.genai import errors

    with pytest.raises((openai.BadRequestError, errors.ClientError), match=r"does not exist|not found"):
        await ProviderEmbedder(config, provider, "no-such-embedder").embed(["x"])


def test_simulator_embedding_errors_as_the_apis_word_them(sim: Any) -> None:
    import httpx

    r = httpx.post(
        f"{sim.url}/v1/embeddings",
        json={"model": "text-embedding-3-small"},
        headers={"Authorization": "Bearer k"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(f"{sim.url}/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert r.status_code == 401
    r = httpx.post(
        f"{sim.url}/v1beta/models/gemini-embedding-001:embedContent",
        json={"content": {"parts": [{"text": "hi"}]}, "outputDimensionality": 8},
        headers={"x-goog-api-key": "k"},
    )
    assert r.status_code == 200 and len(r.json()["embedding"]["values"]) == 8


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_proposal_cache_is_a_model_caller_over_the_transport(streamed: bool) -> None:
    """A proposer call asked again (same request, same scope) is answered from the cache without
    reaching the transport, free, in both of the seam's ways; another scope asks the transport."""
    from moa.cache import CacheTicket, ProposalCache, ResponseCache
    from moa.caller import ModelCaller
    from moa.testing import ScriptedCaller
    from moa.types import CallRequest, CallResult

    inner = ScriptedCaller(default="a proposal")
    cache = ResponseCache(CacheConfig(enabled=True), MemoryStore(1 << 20))
    req = CallRequest(
        provider="openai", model="gpt-4.1-mini", messages=(ChatMessage(role="user", content="Hi"),)
    )

    async def ask(scope: str) -> CallResult:
        caller = ProposalCache(inner, cache, CacheTicket.for_request(scope))
        assert isinstance(caller, ModelCaller)
        if not streamed:
            return await caller.call(req)
        events = [ev async for ev in caller.stream(req)]
        assert isinstance(events[-1], CallResult)
        return events[-1]

    first = await ask("alice")
    again = await ask("alice")
    other = await ask("bob")
    assert first.text == again.text == other.text == "a proposal"
    assert len(inner.calls) == 2  # alice's repeat never reached the transport
    assert again.cache == "exact" and again.cost_usd == 0.0 and first.cache is None
