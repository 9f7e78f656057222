"""API keys and budgets over HTTP: the in-process API with a real SQLite state file, keys made by
``moa keys`` itself, called with the official ``openai`` client (and raw HTTP for concurrency)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moa.auth import new_key, new_record
from moa.cli import main
from moa.config import MoAConfig, SimulatorMode, load_config
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits, Reservation, StateStore, to_micro, window_of
from moa.state.sqlite_store import SQLiteStore
from moa_observability.tracing import flush_tracing
from tests.helpers import (
    QUESTION,
    ApiServer,
    by_name,
    set_fault,
    sim_stats,
    sim_total_requests,
    wait_for_spans,
)
from tests.otlp_receiver import OTLPReceiver
from tests.waiting import wait_until, wait_until_sync

SHORT = [{"role": "user", "content": "Name a colour."}]
# auto routes this to its complex tier (moa), SHORT to its simple one (single).
HARD = [
    {
        "role": "user",
        "content": "Analyse and compare, step by step, the trade-offs of three "
        "consensus protocols (Raft, Paxos, PBFT) for a geo-distributed database; prove which "
        "one tolerates Byzantine faults and explain why. Consider latency, throughput and cost?",
    }
]


@pytest.fixture
def server(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "server": cfg.server.model_copy(update={"max_concurrent_requests": 256}),
        }
    )
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        yield s


def create_key(capsys: pytest.CaptureFixture[str], name: str, *options: str) -> str:
    """``moa keys create`` as an operator runs it; the key is the one line on stdout."""
    capsys.readouterr()
    assert main(["keys", "create", name, *options]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    return key


def burst(server: ApiServer, key: str, body: dict[str, Any], n: int) -> list[httpx.Response]:
    """``n`` copies of one chat completion sent at once with ``key``: the responses, in order."""

    async def send() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n)))

    return asyncio.run(send())


def wait_for_auth(server: ApiServer) -> None:
    """A replica that saw no key may run open for up to state.key_cache_s more: wait it out."""

    def status() -> int:
        return httpx.get(server.url + "/v1/models").status_code

    wait_until_sync(status, lambda s: s == 401, what="the API to require a key")


def client(server: ApiServer, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "unused", max_retries=0)


def cfg_of(server: ApiServer) -> MoAConfig:
    return server.config


def _single_projection(server: ApiServer) -> float:
    """The most one short `single` request (SHORT, max_tokens 40) may cost on this server."""
    from moa.engine.cost import projected_cost
    from moa.types import ChatMessage, GenerationParams

    cfg = cfg_of(server)
    message = ChatMessage(role="user", content=SHORT[0]["content"])
    return projected_cost(cfg, cfg.presets["single"], [message], GenerationParams(max_tokens=40))


def test_open_until_a_key_exists_then_every_request_needs_one(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert client(server, None).chat.completions.create(model="single", messages=SHORT)  # type: ignore[arg-type]
    key = create_key(capsys, "alice")
    # Within the replica's cache time (state.key_cache_s) the open state ends.
    wait_for_auth(server)
    with pytest.raises(openai.AuthenticationError) as anonymous:
        client(server, None).chat.completions.create(model="single", messages=SHORT)  # type: ignore[arg-type]
    assert anonymous.value.code == "invalid_api_key" and anonymous.value.status_code == 401
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "single", "messages": SHORT})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, new_key()).models.list()
    assert wrong.value.code == "invalid_api_key"
    assert key not in missing.text and key not in str(wrong.value.body)
    assert client(server, key).chat.completions.create(model="single", messages=SHORT).choices  # type: ignore[arg-type]
    assert httpx.get(server.url + "/healthz").status_code == 200  # health stays open for probes


def test_a_revoked_key_stops_working_within_the_cache_time(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/SECURITY.md: a revoked key stops working within ``state.key_cache_s`` (1 s). On the
    authenticator's injected clock, with the key's record cached at t: at t + key_cache_s the
    revoked key still works (the cache, not luck, is what is measured), a moment later it is
    refused. A cache time of 20 s fails here, where a wait of up to 30 s would not."""
    key = create_key(capsys, "bob")
    wait_for_auth(server)
    assert server.server.api is not None
    auth = server.server.api.access.auth
    assert auth is not None
    cache_s = cfg_of(server).state.key_cache_s
    assert auth.cache_s == cache_s == 1.0
    now = [1000.0]
    auth.clock = lambda: now[0]
    auth.forget()
    c = client(server, key)
    assert c.models.list().data  # the record is cached at t = 1000
    assert main(["keys", "revoke", "bob"]) == 0

    def refused() -> bool:
        try:
            c.models.list()
        except openai.AuthenticationError as e:
            assert e.code == "invalid_api_key" and "revoked" in e.message
            return True
        return False

    now[0] += cache_s
    assert not refused()  # still within the cache time
    now[0] += 0.001
    assert refused()
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "bob" in listing and "revoked" in listing and key not in listing


def test_presets_models_and_detail_are_limited_per_key(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key(
        capsys,
        "narrow",
        "--presets",
        "single",
        "moa-lite",
        "--models",
        "openai/gpt-4.1-mini",
        "anthropic/claude-haiku-4-5",
        "gemini/gemini-2.5-flash",
    )
    wait_for_auth(server)
    c = client(server, key)
    with pytest.raises(openai.PermissionDeniedError) as preset:
        c.chat.completions.create(model="moa", messages=SHORT)  # type: ignore[arg-type]
    assert preset.value.status_code == 403 and "preset" in preset.value.message
    # moa-lite is an allowed preset, but its aggregators are not among the key's models.
    with pytest.raises(openai.PermissionDeniedError) as model:
        c.chat.completions.create(model="moa-lite", messages=SHORT)  # type: ignore[arg-type]
    assert "openai/gpt-4.1" in model.value.message
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="openai/gpt-4.1", messages=SHORT)  # type: ignore[arg-type]
    assert c.chat.completions.create(model="openai/gpt-4.1-mini", messages=SHORT).choices  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError) as detail:
        c.chat.completions.create(model="single", messages=SHORT, extra_body={"moa": {"detail": True}})  # type: ignore[arg-type]
    assert detail.value.body["param"] == "moa.detail"  # type: ignore[index]
    # Single's whole fallback chain is allowed, so single runs.
    assert c.chat.completions.create(model="single", messages=SHORT).choices  # type: ignore[arg-type]


def test_requests_per_minute_get_429_with_retry_after(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key(capsys, "slow", "--rpm", "1")
    wait_for_auth(server)
    c = client(server, key)
    assert c.models.list().data
    with pytest.raises(openai.RateLimitError) as limited:
        c.models.list()
    assert limited.value.code == "rate_limit_exceeded"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


def test_many_concurrent_requests_never_overspend_a_small_budget(
    server: ApiServer, capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    """Forty requests at once against a budget that holds a handful of worst cases: the ledger
    ends within budget plus one request's projection, equals what the answers report they cost,
    and the rest are refused with 429 insufficient_quota."""
    budget = 0.002
    key = create_key(capsys, "small", "--budget-usd", str(budget), "--detail")
    wait_for_auth(server)
    body = {"model": "single", "messages": SHORT, "max_tokens": 40, "moa": {"detail": True}}

    responses = burst(server, key, body, 40)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 40
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    assert {r.json()["error"]["type"] for r in refused} == {"insufficient_quota"}
    reported = sum(r.json()["moa"]["totals"]["cost_usd"] for r in ok)

    one = _single_projection(server)

    async def ledger() -> int:
        store = SQLiteStore(state_dir / "state.db")
        try:
            (record,) = await store.list_keys()
            return await store.spent(record.id, "total")
        finally:
            await store.close()

    spent = asyncio.run(ledger())
    assert spent <= to_micro(budget) + to_micro(one)
    # Each request settles its real cost, rounded up to the micro-dollar.
    assert to_micro(reported) - len(ok) <= spent <= to_micro(reported) + len(ok)


def test_a_client_that_hangs_up_mid_stream_still_settles(
    server: ApiServer, sim: SimulatorServer, state_dir: Path
) -> None:
    """The reservation is released and the calls made are charged when the client goes away."""
    key = new_key()
    limits = KeyLimits(budget_usd=1.0)
    record = new_record("stream", key, limits)

    async def scenario() -> tuple[int, bool]:
        store: StateStore = SQLiteStore(state_dir / "state.db")
        try:
            await store.create_key(record)
            await asyncio.to_thread(wait_for_auth, server)
            body = {"model": "moa-lite", "messages": QUESTION, "stream": True, "max_tokens": 200}
            headers = {"Authorization": f"Bearer {key}"}
            async with (
                httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http,
                http.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                assert response.status_code == 200
                # The role chunk comes at admission; hang up once the answer's text is flowing.
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                        break

            async def charged() -> int:
                return await store.spent(record.id, "total")

            spent = await wait_until(charged, lambda v: v > 0, what="the abandoned request to settle")
            # Nothing is still held: the whole remaining budget can be reserved.
            left = to_micro(1.0) - spent
            got = await store.reserve(record.id, window_of("total", time.time()), left, to_micro(1.0), 60)
            return spent, isinstance(got, Reservation)
        finally:
            await store.close()

    spent, released = asyncio.run(scenario())
    assert spent > 0 and released


def test_a_cost_cap_moves_auto_to_a_cheaper_tier_and_refuses_a_forced_preset(
    server: ApiServer,
) -> None:
    c = client(server, None)
    hard = HARD
    uncapped = c.chat.completions.create(model="auto", messages=hard, extra_body={"moa": {"detail": True}})  # type: ignore[arg-type]
    assert uncapped.model_extra["moa"]["preset"] != "single"  # type: ignore[index]
    capped = c.chat.completions.create(
        model="auto",
        messages=hard,
        max_tokens=100,
        extra_body={"moa": {"detail": True, "max_cost_usd": 0.002}},  # type: ignore[arg-type]
    )
    moa: dict[str, Any] = capped.model_extra["moa"]  # type: ignore[index]
    assert moa["preset"] == "single" and "cost cap" in moa["decision"]["reason"]
    assert moa["totals"]["cost_usd"] <= 0.002
    with pytest.raises(openai.BadRequestError) as over:
        c.chat.completions.create(model="moa", messages=hard, extra_body={"moa": {"max_cost_usd": 0.0001}})  # type: ignore[arg-type]
    assert over.value.code == "over_cap" and over.value.body["param"] == "moa.max_cost_usd"  # type: ignore[index]


def test_serve_refuses_a_public_address_with_no_key(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before Ray starts: loopback runs open and says so; any other address needs a key
    or an explicit --no-auth."""
    from moa.config import ConfigError
    from moa.exposure import check_exposure

    state = load_config(None).state
    assert "OPEN" in check_exposure(state, "127.0.0.1", no_auth=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err
    assert "OPEN" in check_exposure(state, "0.0.0.0", no_auth=True)
    create_key(capsys, "ops")
    assert "required" in check_exposure(state, "0.0.0.0", no_auth=False)
    # Another state (no keys there) is open again, so refused off loopback.
    other = state.model_copy(update={"redis_url": None})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOA_STATE_DIR", str(state_dir / "elsewhere"))
        with pytest.raises(ConfigError):
            check_exposure(other, "10.0.0.5", no_auth=False)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_keys_usage_is_on_its_requests_server_span(
    server: ApiServer, capsys: pytest.CaptureFixture[str], otlp: OTLPReceiver, stream: bool
) -> None:
    """Per-key usage in traces: the server span names the key (never the key itself) and carries
    what the request cost it, the same figure its answer reports and the ledger settles."""
    key = create_key(capsys, "traced", "--detail")
    wait_for_auth(server)
    body = {"model": "moa-lite", "messages": SHORT, "stream": stream, "moa": {"detail": True}}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        detail = next(e["moa"] for e in events if "moa" in e)
    else:
        detail = r.json()["moa"]
    name = "POST /v1/chat/completions"
    (span,) = by_name(wait_for_spans(otlp, r.headers["x-moa-trace-id"], {name}), name)
    attrs = span["attributes"]
    assert attrs["moa.key"] == "traced" and key not in json.dumps(attrs)
    assert attrs["moa.cost.projected_usd"] >= attrs["moa.key.cost_usd"] > 0
    assert attrs["moa.key.cost_usd"] == pytest.approx(detail["totals"]["cost_usd"])
    assert attrs["moa.tokens.projected"] >= attrs["moa.key.tokens"] > 0


def test_streaming_refusals_are_plain_http_errors_before_any_byte(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stream's headers go out once the request is admitted; a key's refusal comes before."""
    key = create_key(capsys, "tiny", "--budget-usd", "0.000001")
    wait_for_auth(server)
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True}
    for headers, status, code in (
        ({}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {key}"}, 429, "insufficient_quota"),
    ):
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as r:
            r.read()
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == code


def test_tokens_per_minute_get_429_once_the_minute_is_spent(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tpm``: once a key's requests used its tokens for this minute, the next is refused with
    429 ``rate_limit_exceeded`` and a Retry-After within the minute (docs/SECURITY.md)."""
    key = create_key(capsys, "wordy", "--tpm", "50")
    wait_for_auth(server)
    c = client(server, key)
    answer = c.chat.completions.create(model="single", messages=SHORT)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.total_tokens > 50, answer.usage

    def refused() -> openai.RateLimitError | None:
        try:
            c.models.list()
        except openai.RateLimitError as e:
            return e
        return None

    # The request's tokens are settled as it ends: wait for that, not for a clock.
    limited = wait_until_sync(refused, what="the key's tokens for this minute to be spent")
    assert limited is not None and limited.code == "rate_limit_exceeded"
    assert 1 <= int(limited.response.headers["retry-after"]) <= 60


def test_a_staircase_override_is_projected_and_capped_as_it_will_run(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``moa.aggregation: staircase`` makes moa up to 25 calls instead of 10: the cost cap and the
    budget reservation hold that plan, not the preset's. A plain request runs staircase as final,
    so it is projected (and let through) as final."""
    from moa.engine.cost import projected_cost
    from moa.types import ChatMessage, GenerationParams

    cfg = cfg_of(server)
    ask = [ChatMessage(role="user", content=SHORT[0]["content"])]
    params = GenerationParams(max_tokens=200)
    moa = cfg.presets["moa"]
    final = projected_cost(cfg, moa, ask, params)
    stair = projected_cost(cfg, moa.model_copy(update={"aggregation": "staircase"}), ask, params)
    assert moa.aggregation == "final" and final < stair
    between = (final + stair) / 2
    body: dict[str, Any] = {"model": "moa", "messages": SHORT, "max_tokens": 200}
    staircase = {"aggregation": "staircase", "detail": True}

    def post(key: str | None, stream: bool, moa: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={**body, "stream": stream, "moa": moa},
            headers=headers,
            timeout=60,
        ) as r:
            r.read()
        return r

    capped = post(None, True, {**staircase, "max_cost_usd": between})
    assert capped.status_code == 400, capped.text
    assert capped.json()["error"]["code"] == "over_cap"
    assert capped.json()["error"]["param"] == "moa.max_cost_usd"
    plain = post(None, False, {**staircase, "max_cost_usd": between})
    assert plain.status_code == 200, plain.text
    assert plain.json()["moa"]["aggregation"] == "final"
    assert plain.json()["moa"]["totals"]["cost_usd"] <= between

    # A budget between the two holds one final moa, but not a staircase one.
    key = create_key(capsys, "stairs", "--budget-usd", f"{between:.6f}", "--detail")
    wait_for_auth(server)
    refused = post(key, True, staircase)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert post(key, True, {"detail": True}).status_code == 200


def test_auto_routes_only_to_presets_the_key_may_use(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key limited to ``auto single`` never gets moa through auto: auto moves to the nearest
    cheaper tier the key may use; with none (a simple request, a key without single) it is a 403
    naming the preset auto chose. Never to a dearer tier."""
    lite = create_key(capsys, "lite", "--presets", "auto", "moa-lite", "single", "--detail")
    narrow = create_key(capsys, "narrow", "--presets", "auto", "single", "--detail")
    dear = create_key(capsys, "dear", "--presets", "auto", "moa")
    wait_for_auth(server)
    detail = {"moa": {"detail": True}}
    routed = {}
    for name, key in (("lite", lite), ("narrow", narrow)):
        answer = client(server, key).chat.completions.create(model="auto", messages=HARD, extra_body=detail)  # type: ignore[arg-type]
        routed[name] = answer.model_extra["moa"]  # type: ignore[index]
    assert routed["lite"]["preset"] == "moa-lite"
    assert routed["narrow"]["preset"] == "single"
    assert "single instead: this key may not use moa" in routed["narrow"]["decision"]["reason"]
    assert {c["model"] for c in routed["narrow"]["calls"]} <= {
        ref.model for ref in cfg_of(server).presets["single"].aggregators
    } | {ref.model for ref in cfg_of(server).presets["single"].fallbacks}
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(server, dear).chat.completions.create(model="auto", messages=SHORT)  # type: ignore[arg-type]
    assert refused.value.code == "permission_denied" and "'single'" in refused.value.message
    assert client(server, dear).chat.completions.create(model="auto", messages=HARD).choices  # type: ignore[arg-type]


def test_tokens_per_minute_are_held_at_admission_not_counted_after(
    server: ApiServer, capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    """``--tpm 500`` and twelve moa-lite requests at once: each holds its projected tokens when
    it is admitted, so the first (alone in its minute: its projection alone is over 500) runs and
    the rest are refused with the rate limit's 429 and Retry-After. The minute then counts what
    the one request really used, not its projection."""
    key = create_key(capsys, "bursty", "--tpm", "500")
    wait_for_auth(server)
    if time.time() % 60 > 45:  # the twelve must land in one minute
        time.sleep(60 - time.time() % 60 + 0.1)
    body = {"model": "moa-lite", "messages": SHORT}

    responses = burst(server, key, body, 12)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 1 and len(refused) == 11, [r.status_code for r in responses]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    used = ok[0].json()["usage"]["total_tokens"]

    with contextlib.closing(sqlite3.connect(state_dir / "state.db")) as db:
        (counted,) = db.execute(
            "SELECT SUM(tokens) FROM rate JOIN keys ON keys.id = rate.key_id WHERE keys.name = 'bursty'"
        ).fetchone()
    assert counted == used


def test_one_key_cannot_take_every_admission_slot(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four slots on the replica: a key with no limit of its own holds at most half of them
    (server.key_concurrency_share), one made with --max-concurrent 1 one; past that it gets 429
    concurrency_limit_exceeded with Retry-After and no model is called, while another key's
    request still gets a slot."""
    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "server": cfg.server.model_copy(update={"max_concurrent_requests": 4}),
        }
    )
    hog = create_key(capsys, "hog")
    one = create_key(capsys, "one", "--max-concurrent", "1")
    other = create_key(capsys, "other")
    # The aggregator streams so slowly that the streams stay open until the client closes them.
    set_fault(sim, "gpt-4.1", slow_stream={"rate": 1.0, "factor": 200})
    stream = {"model": "moa-lite", "messages": QUESTION, "stream": True}
    url = "/v1/chat/completions"

    async def scenario(server: ApiServer) -> tuple[list[httpx.Response], int, int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

            def auth(key: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {key}"}

            async def hold(key: str, flowing: asyncio.Event) -> None:
                async with http.stream("POST", url, json=stream, headers=auth(key)) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if '"content": "' in line and '"content": ""' not in line:
                            flowing.set()  # every call of the request has been made

            flowing = [asyncio.Event() for _ in range(3)]
            held = [asyncio.create_task(hold(k, e)) for k, e in zip((hog, hog, one), flowing, strict=True)]
            await asyncio.gather(*(e.wait() for e in flowing))
            calls = sum(m["requests"] for m in sim_stats(sim).values())
            refused = [await http.post(url, json=stream, headers=auth(k)) for k in (hog, one)]
            calls_after = sum(m["requests"] for m in sim_stats(sim).values())
            answered = await http.post(url, json={"model": "single", "messages": SHORT}, headers=auth(other))
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            # Streams that ended give their key's places back.
            single = {"model": "single", "messages": SHORT}
            for key in (hog, one):

                async def ask(key: str = key) -> httpx.Response:
                    return await http.post(url, json=single, headers=auth(key))

                await wait_until(ask, lambda r: r.status_code == 200, what="the key's places back")
            return refused, calls, calls_after, answered.status_code

    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as server:
        wait_for_auth(server)
        refused, calls, calls_after, answered = asyncio.run(scenario(server))
    for r in refused:
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert r.headers["retry-after"] == "1"
    assert "max_concurrent" in refused[1].json()["error"]["message"]
    assert calls_after == calls  # a refused request calls nothing
    assert answered == 200


# -- the router's LLM classifier: scoped per key, and paid for by the request ---------------------


@pytest.fixture
def llm_routed(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    """``router.classifier: llm`` (the response cache off: the classifier's own cache is tested)."""
    cfg = load_config(None)
    router = cfg.router.model_dump() | {
        "classifier": "llm",
        "classifier_model": {"provider": "openai", "model": "gpt-4o-mini"},
    }
    cfg = cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "router": type(cfg.router).model_validate(router),
        }
    )
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        yield s


def ask_auto(server: ApiServer, key: str, detail: bool = False) -> httpx.Response:
    body = {"model": "auto", "messages": SHORT, "moa": {"detail": detail}}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def classified(response: httpx.Response) -> bool:
    """Whether the request paid a classifier call (its detail lists one), rather than its cache."""
    assert response.status_code == 200, response.text
    detail = response.json()["moa"]
    made = any(c["stage"] == "classifier" for c in detail["calls"])
    assert made != detail["decision"]["classifier_cached"]
    return made


async def key_spent(state_dir: Path, name: str) -> int:
    store = SQLiteStore(state_dir / "state.db")
    try:
        record = await store.key_by_name(name)
        assert record is not None
        return await store.spent(record.id, "total")
    finally:
        await store.close()


def test_the_llm_classifiers_answers_are_cached_per_key(
    llm_routed: ApiServer, sim: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """One tenant cannot learn that another asked a question: a classification cached for one key
    (faster, and marked ``classifier_cached``) is never another key's."""
    ann = create_key(capsys, "ann", "--detail")
    ben = create_key(capsys, "ben", "--detail")
    wait_for_auth(llm_routed)
    assert classified(ask_auto(llm_routed, ann, detail=True))
    assert classified(ask_auto(llm_routed, ben, detail=True))  # the same question from another key: afresh
    assert not classified(
        ask_auto(llm_routed, ann, detail=True)
    )  # the first key's own repeat: from its cache
    assert not classified(ask_auto(llm_routed, ben, detail=True))


def test_a_request_refused_for_budget_still_pays_its_classifier_call(
    llm_routed: ApiServer, sim: SimulatorServer, capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    """The classifier's call is made (its reservation fits the budget), then the plan's projection
    does not: 429, and the ledger holds what the classifier's call cost, not $0."""
    key = create_key(capsys, "cleo", "--budget-usd", "0.0001")  # a classifier call, not a preset
    wait_for_auth(llm_routed)
    refused = ask_auto(llm_routed, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert sim_total_requests(sim) == 1  # the classifier's call, and nothing after it
    spent = asyncio.run(key_spent(state_dir, "cleo"))
    assert 0 < spent <= to_micro(0.0001)


def test_no_classifier_call_for_a_key_whose_budget_is_spent(
    llm_routed: ApiServer, sim: SimulatorServer, capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    """A key with nothing left is refused before the router pays for a classification."""
    key = create_key(capsys, "dora", "--budget-usd", "0")
    wait_for_auth(llm_routed)
    refused = ask_auto(llm_routed, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert sim_total_requests(sim) == 0
    assert asyncio.run(key_spent(state_dir, "dora")) == 0


CLIENT_LOGGERS = ("httpx", "httpcore")


def _leaks(key: str, caplog: pytest.LogCaptureFixture, otlp: OTLPReceiver, texts: list[str]) -> list[str]:
    """Where any 12 characters of ``key``'s random part show (a key cut short leaks too): log
    records (message and every extra field), every span exported so far (names, attributes,
    events), and the texts given."""
    secret = key.removeprefix("sk-moa-")
    fragments = {secret[i : i + 12] for i in range(len(secret) - 11)}
    # The test's own HTTP client logs the URLs it requests: that is the caller, not the service.
    ours = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    places = [f"log {r.name}: {vars(r)}" for r in ours]
    flush_tracing()
    places += [f"span {s['name']}: {s}" for s in otlp.spans]
    places += [f"response: {t}" for t in texts]
    return [p[:200] for p in places if any(f in p for f in fragments)]


def _exchange(r: httpx.Response) -> str:
    """All a client sees of a response: status, headers and body."""
    return f"{r.status_code} {dict(r.headers)} {r.text}"


def test_a_real_key_reaches_no_log_span_error_or_response(
    server: ApiServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    otlp: OTLPReceiver,
) -> None:
    """docs/SECURITY.md: keys that were really sent (valid, revoked, on routes that do not exist,
    with a wrong method, with a broken body, in the query string, as x-api-key) appear in no log
    record, no exported span and no response. Each request's access log line and server span are
    checked to be there, so an empty capture cannot pass."""
    caplog.set_level(logging.DEBUG)
    valid = create_key(capsys, "valid", "--detail")
    revoked = create_key(capsys, "revoked")
    wait_for_auth(server)
    assert main(["keys", "revoke", "revoked"]) == 0
    seen: list[httpx.Response] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for key in (valid, revoked):
            bearer = {"Authorization": f"Bearer {key}"}
            body = {"model": "moa-lite", "messages": SHORT, "moa": {"detail": True}}
            seen += [
                http.post("/v1/chat/completions", json=body, headers=bearer),
                http.post("/v1/chat/completions", json={**body, "stream": True}, headers=bearer),
                http.get("/v1/models", headers=bearer),
                http.get("/v1/no-such-route", headers=bearer),
                http.delete("/v1/chat/completions", headers=bearer),
                http.post("/v1/chat/completions", content=b"{not json", headers=bearer),
                http.post("/v1/chat/completions", json={"model": "moa-lite"}, headers=bearer),
                http.get("/v1/models", params={"api_key": key}),
                http.get("/v1/models", headers={"x-api-key": key}),
                http.get("/healthz", headers=bearer),
            ]
    statuses = [r.status_code for r in seen]
    assert statuses[:3] == [200, 200, 200], [_exchange(r) for r in seen[:3]]
    assert all(s == 401 for s in statuses[10:13]), [_exchange(r) for r in seen[10:13]]
    assert "revoked" in seen[10].text  # the refusal says why, without the key
    # Nothing vacuous: every request was access-logged and its server span exported.
    logged = [r for r in caplog.records if getattr(r, "event", None) == "request"]
    assert len(logged) >= len(seen)
    ids = {r.headers["x-moa-trace-id"] for r in seen if "x-moa-trace-id" in r.headers}
    assert len(ids) == len(seen)
    for trace_id in ids:
        wait_until_sync(lambda t=trace_id: otlp.trace(t), bool, interval=0.2, what=f"spans of {trace_id}")
    for key in (valid, revoked):
        assert not _leaks(key, caplog, otlp, [_exchange(r) for r in seen])


def test_a_key_sent_in_the_url_path_reaches_no_log_or_span(
    server: ApiServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    otlp: OTLPReceiver,
) -> None:
    """A client that puts its key in the path (``/v1/<key>``, ``/v1/models/<key>``) gets a 404
    or 401 that does not echo it, and the key reaches no log record and no span."""
    caplog.set_level(logging.DEBUG)
    key = create_key(capsys, "pathed")
    wait_for_auth(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        bearer = {"Authorization": f"Bearer {key}"}
        seen = [http.get(f"/v1/{key}", headers=bearer), http.get(f"/v1/models/{key}"), http.get(f"/{key}")]
    assert all(r.status_code in (401, 404) for r in seen), [_exchange(r) for r in seen]
    ids = {r.headers["x-moa-trace-id"] for r in seen if "x-moa-trace-id" in r.headers}
    for trace_id in ids:
        wait_until_sync(lambda t=trace_id: otlp.trace(t), bool, interval=0.2, what=f"spans of {trace_id}")
    assert not _leaks(key, caplog, otlp, [_exchange(r) for r in seen])


@pytest.mark.parametrize("period", ["day", "month"])
def test_a_budget_period_rolls_over_at_the_utc_calendar_through_the_api(
    server: ApiServer, capsys: pytest.CaptureFixture[str], state_dir: Path, period: str
) -> None:
    """docs/SECURITY.md: ``--period day|month`` budgets are per UTC calendar day or month. With the
    API's wall clock moved (``Access.clock``): a budget of exactly one request's projection is spent
    by one request at 23:59:30 on 31 January, refused the next, fresh a minute later on 1 February;
    on 2 February a day budget is fresh again while a month budget is still spent. Each request is
    settled in its own window of the ledger."""
    one = _single_projection(server)
    key = create_key(capsys, "calendar", "--budget-usd", repr(one), "--period", period)
    wait_for_auth(server)
    assert server.server.api is not None
    now = [datetime(2026, 1, 31, 23, 59, 30, tzinfo=UTC).timestamp()]
    server.server.api.access.clock = lambda: now[0]
    c = client(server, key)

    def ask() -> int:
        try:
            c.chat.completions.create(model="single", messages=SHORT, max_tokens=40)  # type: ignore[arg-type]
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota", e.message
            return 429
        return 200

    assert [ask(), ask()] == [200, 429]
    now[0] += 60  # 1 February, 00:00:30
    assert [ask(), ask()] == [200, 429]
    now[0] += 86400  # 2 February
    assert ask() == (200 if period == "day" else 429)

    async def ledger() -> dict[str, int]:
        store = SQLiteStore(state_dir / "state.db")
        try:
            (record,) = await store.list_keys()
            windows = ("day:2026-01-31", "day:2026-02-01", "day:2026-02-02", "month:2026-01", "month:2026-02")
            return {w: await store.spent(record.id, w) for w in (*windows, "total")}
        finally:
            await store.close()

    spent = {w: v for w, v in asyncio.run(ledger()).items() if v}
    if period == "day":
        assert set(spent) == {"day:2026-01-31", "day:2026-02-01", "day:2026-02-02"}
    else:
        assert set(spent) == {"month:2026-01", "month:2026-02"}
    assert all(0 < v <= to_micro(one) for v in spent.values())
