"""The response cache through the HTTP API, with the official OpenAI SDK against the simulator:
exact hits of final answers and proposer calls, streaming replay, controls, what is never
stored, tenant isolation, and replicas sharing SQLite or Redis."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moa.cache.store import CLEAR_CHECK_S
from moa.cli import main
from moa.config import (
    BUNDLED_SOURCE,
    CacheConfig,
    MoAConfig,
    SemanticCacheConfig,
    SimulatorMode,
    StateConfig,
    load_config,
)
from moa.simulator.server import SimulatorServer
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer, by_name, set_fault, sim_total_requests, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.test_keys_api import create_key, wait_for_auth

Q = "Explain how a hash map handles collisions."


def cached_config(sim: SimulatorServer, state_dir: Path, **cache: Any) -> MoAConfig:
    cfg = load_config(None)
    return cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "cache": CacheConfig(enabled=True, **{"store": "sqlite", **cache}),
            "state": StateConfig(dir=str(state_dir)),
        }
    )


def wipe_redis_cache(redis_url: str) -> None:
    """Empty the cache a Redis-backed test wrote (the session's redis-server outlives the test)."""
    import asyncio

    from moa.cache.redis_store import RedisCacheStore

    async def wipe() -> None:
        r = RedisCacheStore(redis_url, 1 << 20, 60)
        await r.clear(None)
        await r.close()

    asyncio.run(wipe())


def chat(url: str, key: str = "unused", **body: Any) -> httpx.Response:
    body = {"model": "moa-lite", "messages": [{"role": "user", "content": Q}], **body}
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    return r


@pytest.fixture
def server(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    with ApiServer(cached_config(sim, state_dir)) as s:
        yield s


def test_a_repeat_is_an_exact_hit_with_zero_usage_and_the_cost_saved(
    server: ApiServer, sim: SimulatorServer
) -> None:
    first = chat(server.url, moa={"detail": True})
    assert first.status_code == 200, first.text
    assert first.headers["x-moa-cache"] == "miss"
    sent = sim_total_requests(sim)
    second = chat(server.url, moa={"detail": True})
    assert second.headers["x-moa-cache"] == "hit-exact"
    assert sim_total_requests(sim) == sent  # nothing reached a provider
    a, b = first.json(), second.json()
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    assert b["usage"]["prompt_tokens"] == b["usage"]["completion_tokens"] == 0
    detail = b["moa"]
    assert detail["cache"]["status"] == "hit-exact"
    assert detail["cache"]["saved_cost_usd"] == pytest.approx(a["moa"]["totals"]["cost_usd"])
    assert detail["cache"]["saved_cost_usd"] > 0
    assert {c["cache"] for c in detail["calls"]} == {"exact"}
    assert all(c["cost_usd"] == 0 for c in detail["calls"])


def test_a_stream_replays_the_cached_answer_as_sse_chunks(server: ApiServer, sim: SimulatorServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    text = client.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": Q}])
    sent = sim_total_requests(sim)
    with client.chat.completions.with_streaming_response.create(
        model="moa-lite",
        messages=[{"role": "user", "content": Q}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-moa-cache"] == "hit-exact"
        chunks = list(response.parse())
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # chunks, not one blob
    assert "".join(pieces) == text.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    assert sim_total_requests(sim) == sent


def test_no_cache_no_store_and_off(server: ApiServer, sim: SimulatorServer) -> None:
    assert chat(server.url, moa={"cache": "no-store"}).headers["x-moa-cache"] == "miss"
    assert chat(server.url).headers["x-moa-cache"] == "miss"  # no-store stored nothing
    assert chat(server.url, moa={"cache": "no-cache"}).headers["x-moa-cache"] == "bypass"
    sent = sim_total_requests(sim)
    assert chat(server.url, moa={"cache": "off"}).headers["x-moa-cache"] == "bypass"
    assert sim_total_requests(sim) > sent
    assert chat(server.url).headers["x-moa-cache"] == "hit-exact"
    bad = chat(server.url, moa={"cache": "sometimes"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "moa.cache"


def test_a_fresh_sample_is_not_served_unless_allowed(server: ApiServer) -> None:
    assert chat(server.url, temperature=0.8).headers["x-moa-cache"] == "bypass"
    assert chat(server.url, temperature=0.8).headers["x-moa-cache"] == "bypass"
    assert (
        chat(server.url, temperature=0.8, moa={"cache_sampled": True}).headers["x-moa-cache"] == "hit-exact"
    )
    assert chat(server.url, temperature=0.8, seed=7).headers["x-moa-cache"] == "miss"
    assert chat(server.url, temperature=0.8, seed=7).headers["x-moa-cache"] == "hit-exact"
    assert chat(server.url, temperature=0).headers["x-moa-cache"] == "miss"
    assert chat(server.url, temperature=0).headers["x-moa-cache"] == "hit-exact"


def _plan(aggregator: str, fallbacks: bool = True) -> dict[str, Any]:
    proposers = [
        {"provider": "openai", "model": "gpt-4.1-mini"},
        {"provider": "anthropic", "model": "claude-haiku-4-5"},
        {"provider": "gemini", "model": "gemini-2.5-flash"},
    ]
    plan: dict[str, Any] = {
        "layers": [{"proposers": proposers, "quorum": 2}],
        "aggregators": [{"provider": "openai", "model": aggregator}],
    }
    if not fallbacks:
        plan["fallbacks"] = []
    return plan


def moa(url: str, plan: dict[str, Any]) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": Q}], "plan": plan}
    return httpx.post(f"{url}/v1/moa", json=body, timeout=60)


def test_plans_sharing_proposers_reuse_their_answers(server: ApiServer) -> None:
    first = moa(server.url, _plan("gpt-4.1"))
    assert first.status_code == 200, first.text
    second = moa(server.url, _plan("gpt-4.1-mini"))  # another aggregator: another final answer
    assert second.headers["x-moa-cache"] == "miss"
    body = second.json()
    assert body["cache"]["proposals_from_cache"] == 3
    proposers = [c for c in body["calls"] if c["stage"] == "proposer"]
    assert {c["cache"] for c in proposers} == {"exact"}
    assert all(c["usage"]["output_tokens"] == 0 and c["saved_cost_usd"] > 0 for c in proposers)
    aggregator = [c for c in body["calls"] if c["stage"] == "aggregator"]
    assert aggregator[0]["cache"] is None and aggregator[0]["usage"]["output_tokens"] > 0


def test_a_retry_after_the_aggregator_failed_reuses_the_proposals(
    server: ApiServer, sim: SimulatorServer
) -> None:
    set_fault(sim, "gpt-4.1", error_500={"rate": 1.0})
    plan = _plan("gpt-4.1", fallbacks=False)
    failed = moa(server.url, plan)
    # Answered with a proposal (nothing thrown away), which is never stored as the answer.
    assert failed.status_code == 200 and failed.json()["answer_source"] == "proposal"
    assert failed.json()["cache"]["reason"].startswith("not stored: every aggregator failed")
    assert moa(server.url, plan).json()["answer_source"] == "proposal"  # not served from the cache
    set_fault(sim, "gpt-4.1")
    retry = moa(server.url, plan)
    assert retry.status_code == 200, retry.text
    assert retry.json()["cache"]["proposals_from_cache"] == 3
    assert moa(server.url, plan).headers["x-moa-cache"] == "hit-exact"


def test_cut_answers_and_missed_quorums_are_not_stored(server: ApiServer, sim: SimulatorServer) -> None:
    cut = chat(server.url, max_tokens=3, moa={"detail": True})
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    assert "not stored" in cut.json()["moa"]["cache"]["reason"]
    assert chat(server.url, max_tokens=3).headers["x-moa-cache"] == "miss"
    for model in ("claude-haiku-4-5", "gemini-2.5-flash"):
        set_fault(sim, model, error_500={"rate": 1.0})
    missed = chat(server.url, moa={"detail": True})
    assert missed.status_code == 200 and missed.json()["moa"]["fallback_reason"] == "quorum_missed"
    assert chat(server.url).headers["x-moa-cache"] == "miss"


def test_one_tenant_never_gets_anothers_answer_unless_shared(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = cached_config(sim, state_dir, shared_scopes={"carol": "team", "dave": "team"})
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        keys = {name: create_key(capsys, name) for name in ("alice", "bob", "carol", "dave")}
        wait_for_auth(s)
        assert chat(s.url, keys["alice"]).headers["x-moa-cache"] == "miss"
        assert chat(s.url, keys["alice"]).headers["x-moa-cache"] == "hit-exact"
        assert chat(s.url, keys["bob"]).headers["x-moa-cache"] == "miss"  # bob's own scope
        assert chat(s.url, keys["carol"]).headers["x-moa-cache"] == "miss"
        assert chat(s.url, keys["dave"]).headers["x-moa-cache"] == "hit-exact"  # shared with carol
        # A key whose policy allows reusing samples: its temperature > 0 requests are served.
        erin = create_key(capsys, "erin", "--cache-sampled")
        assert chat(s.url, erin, temperature=0.9).headers["x-moa-cache"] == "miss"
        assert chat(s.url, erin, temperature=0.9).headers["x-moa-cache"] == "hit-exact"
        assert chat(s.url, keys["bob"], temperature=0.9).headers["x-moa-cache"] == "bypass"


def test_proposals_and_semantic_hits_stay_in_their_tenants_scope(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Isolation by what is served, not by a header: bob's plan, which shares alice's proposers,
    gets none of her proposals (``proposals_from_cache`` 0, every proposer called and billed),
    and bob's rephrasing of alice's question is no semantic hit (a fresh answer, not hers); the
    same requests by alice herself, and by dave after carol in a shared scope, are served from
    the cache, so the cache was there to leak."""
    cfg = cached_config(sim, state_dir, shared_scopes={"carol": "team", "dave": "team"})
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        keys = {name: create_key(capsys, name, "--detail") for name in ("alice", "bob", "carol", "dave")}
        wait_for_auth(s)

        def plan_by(name: str, aggregator: str) -> dict[str, Any]:
            body = {"messages": [{"role": "user", "content": Q}], "plan": _plan(aggregator)}
            headers = {"Authorization": f"Bearer {keys[name]}"}
            r = httpx.post(f"{s.url}/v1/moa", json=body, headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            return dict(r.json())

        def proposer_calls(body: dict[str, Any]) -> list[dict[str, Any]]:
            return [c for c in body["calls"] if c["stage"] == "proposer"]

        assert plan_by("alice", "gpt-4.1")["cache"]["proposals_from_cache"] == 0
        bobs = plan_by("bob", "gpt-4.1-mini")
        assert bobs["cache"]["proposals_from_cache"] == 0
        assert all(c["cache"] is None and c["usage"]["output_tokens"] > 0 for c in proposer_calls(bobs))
        alices = plan_by("alice", "gpt-4.1-mini")
        assert alices["cache"]["proposals_from_cache"] == 3
        assert {c["cache"] for c in proposer_calls(alices)} == {"exact"}
        assert plan_by("carol", "gpt-4.1")["cache"]["proposals_from_cache"] == 0
        assert plan_by("dave", "gpt-4.1-mini")["cache"]["proposals_from_cache"] == 3

        def ask(name: str, text: str) -> tuple[str, dict[str, Any], str]:
            r = chat(
                s.url,
                keys[name],
                messages=[{"role": "user", "content": text}],
                moa={"cache_semantic": True, "detail": True},
            )
            assert r.status_code == 200, r.text
            return (
                r.headers["x-moa-cache"],
                r.json()["moa"]["cache"],
                r.json()["choices"][0]["message"]["content"],
            )

        first, _, answer = ask("alice", "How does a hash map handle collisions?")
        assert first == "miss"
        state, cache, bobs_answer = ask("bob", "How are collisions handled in a hash map?")
        assert state == "miss" and cache.get("similarity") is None and bobs_answer != answer
        state, cache, again = ask("alice", "How are collisions handled in a hash map?")
        assert state == "hit-semantic" and 0.8 <= cache["similarity"] < 1 and again == answer


class CountingStore(SQLiteStore):
    """The real SQLite state store, noting each budget write (a reservation, a settlement)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[str] = []

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("reserve")
        return await super().reserve(*args, **kwargs)

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        self.writes.append("settle")
        return await super().settle(*args, **kwargs)


def test_a_hit_writes_nothing_to_a_keys_budget_and_needs_none_of_it(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cached answer costs nothing: no reservation against the key's budget (a state-store
    write per request), so also none refused. A miss still reserves before any model is called."""
    cfg = cached_config(sim, state_dir, shared_scopes={"gail": "team", "hank": "team"})
    store = CountingStore(state_dir / "state.db")
    with ApiServer(cfg, store=lambda: store) as s:
        gail = create_key(capsys, "gail", "--budget-usd", "100")
        hank = create_key(capsys, "hank", "--budget-usd", "0")  # nothing left to spend
        wait_for_auth(s)
        assert chat(s.url, gail).headers["x-moa-cache"] == "miss"
        assert store.writes == ["reserve", "settle"]
        assert chat(s.url, gail).headers["x-moa-cache"] == "hit-exact"
        assert store.writes == ["reserve", "settle"]  # the hit wrote nothing
        served = chat(s.url, hank)  # the team's cached answer, free
        assert served.status_code == 200 and served.headers["x-moa-cache"] == "hit-exact"
        refused = chat(s.url, hank, messages=[{"role": "user", "content": "Something not cached."}])
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        assert store.writes == ["reserve", "settle", "reserve"]  # refused: nothing to settle


def test_a_hit_after_a_paid_classifier_call_still_charges_the_call(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica whose LLM classifier has not seen the question pays for the classification, then
    the shared cache answers: nothing was reserved, but the classifier's cost reaches the ledger."""
    cfg = cached_config(sim, state_dir)
    router = cfg.router.model_dump() | {
        "classifier": "llm",
        "classifier_model": {"provider": "openai", "model": "gpt-4o-mini"},
    }
    cfg = cfg.model_copy(update={"router": type(cfg.router).model_validate(router)})
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as one:
        key = create_key(capsys, "ivy", "--budget-usd", "100")
        wait_for_auth(one)
        assert chat(one.url, key, model="auto").headers["x-moa-cache"] == "miss"
    store = CountingStore(state_dir / "state.db")
    with ApiServer(cfg, store=lambda: store) as other:  # a fresh classifier cache, the same stores
        assert chat(other.url, key, model="auto").headers["x-moa-cache"] == "hit-exact"
        assert store.writes == ["reserve", "settle"]  # the classifier's cost, charged after the fact


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_replicas_share_answers_and_proposals_through_the_store(
    sim: SimulatorServer, state_dir: Path, store: str, request: pytest.FixtureRequest
) -> None:
    extra: dict[str, Any] = {"store": store}
    if store == "redis":
        extra["redis_url"] = request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/5"
    cfg = cached_config(sim, state_dir, **extra)
    with ApiServer(cfg) as one:
        assert moa(one.url, _plan("gpt-4.1")).headers["x-moa-cache"] == "miss"
    with ApiServer(cfg) as other:  # another replica (or the same one restarted): an empty LRU
        assert moa(other.url, _plan("gpt-4.1")).headers["x-moa-cache"] == "hit-exact"
        again = moa(other.url, _plan("gpt-4.1-mini"))
        assert again.json()["cache"]["proposals_from_cache"] == 3
    if store == "redis":
        wipe_redis_cache(extra["redis_url"])


def test_cache_cli_stats_and_clear(
    server: ApiServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI reads the store the server writes (MOA_STATE_DIR: the same SQLite file)."""
    assert chat(server.url).headers["x-moa-cache"] == "miss"
    capsys.readouterr()
    assert main(["cache", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 4 and stats["bytes"] > 0  # the answer and its three proposals
    assert str(state_dir) in stats["store"]
    # The CLI's config (the bundled one) has the cache off while the server's store holds entries:
    # said in so many words, not "enabled False" beside "entries 4" with nothing between.
    assert stats["enabled"] is False and stats["config"] == BUNDLED_SOURCE
    assert main(["cache", "stats"]) == 0
    text = capsys.readouterr().out
    assert "The cache is off in this config" in text and "its 4 entries were written by" in text
    # Given the server's setting, after the verb (once refused): on, and nothing to explain.
    on = state_dir / "cache-on.yaml"
    on.write_text("cache: {enabled: true, store: sqlite}\n")
    assert main(["cache", "stats", "--config", str(on)]) == 0
    text = capsys.readouterr().out
    assert f"config              {on} (over the bundled config)" in text
    assert "enabled             True" in text and "The cache is off" not in text
    assert main(["cache", "clear", "--scope", "key:nobody"]) == 0
    assert "cleared 0 entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--scope", "open"]) == 0
    assert "cleared 4 entries" in capsys.readouterr().out
    # The serving replica's LRU, which the CLI cannot reach, forgets them within CLEAR_CHECK_S.
    time.sleep(CLEAR_CHECK_S + 0.05)
    assert chat(server.url).headers["x-moa-cache"] == "miss"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_semantic_hit_for_a_rephrasing_and_none_for_a_near_miss(
    sim: SimulatorServer, state_dir: Path, store: str, request: pytest.FixtureRequest
) -> None:
    extra: dict[str, Any] = {"store": store}
    if store == "redis":  # plain redis-server: the index is a hash the replica scans
        extra["redis_url"] = request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/6"
    with ApiServer(cached_config(sim, state_dir, **extra)) as s:  # the measured default threshold

        def ask(text: str, semantic: bool = True, system: str | None = None) -> httpx.Response:
            messages = [{"role": "user", "content": text}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            return chat(s.url, messages=messages, moa={"cache_semantic": semantic, "detail": True})

        first = ask("How does a hash map handle collisions?")
        assert first.headers["x-moa-cache"] == "miss"
        hit = ask("How are collisions handled in a hash map?")
        assert hit.headers["x-moa-cache"] == "hit-semantic", hit.json()["moa"]["cache"]
        cache = hit.json()["moa"]["cache"]
        assert 0.8 <= cache["similarity"] < 1 and cache["saved_cost_usd"] > 0
        assert {c["cache"] for c in hit.json()["moa"]["calls"]} == {"semantic"}
        assert {c["similarity"] for c in hit.json()["moa"]["calls"]} == {cache["similarity"]}
        assert (
            hit.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
        )
        # Near misses: a negation, another content word; and no opt-in, or another context.
        assert ask("How does a hash map not handle collisions?").headers["x-moa-cache"] == "miss"
        assert ask("How does a hash map handle deletions?").headers["x-moa-cache"] == "miss"
        assert (
            ask("How are collisions handled in a hash map?", semantic=False).headers["x-moa-cache"] == "miss"
        )
        other = ask("How are collisions handled in a hash map?", system="Answer in French.")
        assert other.headers["x-moa-cache"] == "miss"
    if store == "redis":
        wipe_redis_cache(extra["redis_url"])


def test_semantic_by_preset(sim: SimulatorServer, state_dir: Path) -> None:
    cfg = cached_config(sim, state_dir, semantic=SemanticCacheConfig(presets=("moa-lite",)))
    with ApiServer(cfg) as s:
        assert (
            chat(s.url, messages=[{"role": "user", "content": "What causes inflation?"}]).headers[
                "x-moa-cache"
            ]
            == "miss"
        )
        again = chat(s.url, messages=[{"role": "user", "content": "What are the causes of inflation?"}])
        assert again.headers["x-moa-cache"] == "hit-semantic"


def test_without_the_semantic_extra_exact_hits_work_and_semantic_lookups_are_off(
    sim: SimulatorServer, state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The static embedder is an extra (``moa-serve[semantic]``): without its package the service
    still starts, says once that semantic lookups are off and how to turn them on, serves exact
    hits, and answers a rephrasing asking for a semantic hit as a miss, never an error."""
    monkeypatch.setitem(sys.modules, "static_model", None)  # as if the package were not installed
    with caplog.at_level(logging.WARNING, logger="moa.cache"), ApiServer(cached_config(sim, state_dir)) as s:

        def ask(text: str) -> httpx.Response:
            return chat(s.url, messages=[{"role": "user", "content": text}], moa={"cache_semantic": True})

        assert ask("How does a hash map handle collisions?").headers["x-moa-cache"] == "miss"
        assert ask("How does a hash map handle collisions?").headers["x-moa-cache"] == "hit-exact"
        rephrased = ask("How are collisions handled in a hash map?")
        assert rephrased.status_code == 200 and rephrased.headers["x-moa-cache"] == "miss"
    warned = [r.getMessage() for r in caplog.records if "semantic cache lookups are off" in r.getMessage()]
    assert len(warned) == 1 and "moa-serve[semantic]" in warned[0]


def test_every_lookup_is_a_span_under_the_run_with_its_result_and_similarity(
    sim: SimulatorServer, state_dir: Path, otlp: OTLPReceiver
) -> None:
    """``moa.cache.lookup`` under ``moa.run``: what the lookup found (``moa.cache.result``) and,
    for a semantic hit, how similar the question was; ``moa.cache`` on the run is the header's value."""
    with ApiServer(cached_config(sim, state_dir)) as s:

        def ask(text: str) -> httpx.Response:
            return chat(s.url, messages=[{"role": "user", "content": text}], moa={"cache_semantic": True})

        answers = [
            ask("How does a hash map handle collisions?"),
            ask("How does a hash map handle collisions?"),
            ask("How are collisions handled in a hash map?"),
        ]
    assert [r.headers["x-moa-cache"] for r in answers] == ["miss", "hit-exact", "hit-semantic"]
    for r in answers:
        spans = wait_for_spans(otlp, r.headers["x-moa-trace-id"], {"moa.run", "moa.cache.lookup"})
        (run,) = by_name(spans, "moa.run")
        (lookup,) = by_name(spans, "moa.cache.lookup")
        assert lookup["parent_id"] == run["span_id"]
        assert lookup["attributes"]["moa.cache.result"] == r.headers["x-moa-cache"]
        assert run["attributes"]["moa.cache"] == r.headers["x-moa-cache"]
    semantic = by_name(
        wait_for_spans(otlp, answers[2].headers["x-moa-trace-id"], {"moa.cache.lookup"}), "moa.cache.lookup"
    )
    assert 0.8 <= semantic[0]["attributes"]["moa.cache.similarity"] < 1


def test_an_unreachable_store_makes_misses_not_failures(sim: SimulatorServer, state_dir: Path) -> None:
    """Redis down (nothing listens on the port): every request is still answered; the replica's
    own LRU (written before the shared store failed) still serves repeats."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cached_config(sim, state_dir, store="redis", redis_url=f"redis://127.0.0.1:{port}/0")
    with ApiServer(cfg) as server:
        first = chat(server.url, moa={"detail": True})
        assert first.status_code == 200 and first.headers["x-moa-cache"] == "miss"
        assert "cache store failed" in first.json()["moa"]["cache"]["reason"]
        again = chat(server.url)
        assert again.status_code == 200 and again.headers["x-moa-cache"] == "hit-exact"
        semantic = chat(
            server.url, messages=[{"role": "user", "content": "Why?"}], moa={"cache_semantic": True}
        )
        assert semantic.status_code == 200 and semantic.headers["x-moa-cache"] == "miss"
