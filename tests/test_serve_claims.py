"""The documented claims proven on the topology users deploy: the Ray Serve app on a two-node cluster,
called over HTTP. Each has an in-process twin elsewhere; these show the claim survives the handle
hops, the separate provider replicas and the health board."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from moa.config import parse_config
from moa.simulator.server import SimulatorServer
from tests.helpers import (
    ADMIN_HEADERS,
    QUESTION,
    RAY_MODULE,
    delete_app,
    set_fault,
    sim_stats,
    trimmed_config,
)
from tests.test_serve import answered_by_replica
from tests.waiting import wait_until, wait_until_sync

# moa-lite's proposers, one model per provider: what a direct call names.
MODELS = {"openai": "gpt-4.1-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = RAY_MODULE


def chat(url: str, body: dict[str, Any], prefix: str = "", timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}{prefix}/v1/chat/completions", json=body, timeout=timeout)


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_grace_period_cancels_a_straggler(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "gemini-2.5-flash", hang={"rate": 1.0})  # never answers on its own
    r = chat(url, {"model": "moa-lite", "messages": QUESTION, "moa": {"detail": True}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("Synthesis of 2 references")
    (straggler,) = [c for c in r.json()["moa"]["calls"] if c["model"] == "gemini-2.5-flash"]
    assert straggler["cancelled_straggler"] and "grace period over" in straggler["error_message"]
    # The provider replica on the other node let the hanging request go.
    stats = wait_until_sync(
        lambda: sim_stats(sim)["gemini-2.5-flash"], lambda s: s["in_flight"] == 0, what="gemini released"
    )
    assert stats["cancelled"] == 1 and stats["completed"] == 0


def test_aggregator_fallback_chain(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "gpt-4.1", error_500={"rate": 1.0})  # moa-lite's first aggregator
    r = chat(url, {"model": "moa-lite", "messages": QUESTION, "moa": {"detail": True}})
    assert r.status_code == 200, r.text
    detail = r.json()["moa"]
    aggregators = [(c["model"], c["ok"]) for c in detail["calls"] if c["stage"] == "aggregator"]
    assert aggregators == [("gpt-4.1", False), ("claude-sonnet-4-6", True)]
    assert detail["answered_by"] == "anthropic/claude-sonnet-4-6"
    assert r.json()["choices"][0]["message"]["content"].startswith("Synthesis of 3 references")


def test_every_provider_rate_limited_is_429_with_their_retry_after(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_429={"rate": 1.0, "retry_after_s": 60})
    r = chat(url, {"model": "moa-lite", "messages": QUESTION})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "60" and r.json()["error"]["type"] == "rate_limit_error"


def test_streaming_usage_sums_every_call_and_is_opt_in(url: str) -> None:
    body: dict[str, Any] = {"model": "moa-lite", "messages": QUESTION, "stream": True}
    with_usage = {**body, "stream_options": {"include_usage": True}, "moa": {"detail": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=with_usage, timeout=60) as r:
        events = sse_events(list(r.iter_lines()))
    (last,) = [e for e in events if e.get("usage")]
    calls = last["moa"]["calls"]
    assert len(calls) == 4  # three proposers and the aggregator, all on other processes
    assert last["usage"]["prompt_tokens"] == sum(c["usage"]["input_tokens"] for c in calls)
    assert last["usage"]["completion_tokens"] == sum(c["usage"]["output_tokens"] for c in calls)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        plain = sse_events(list(r.iter_lines()))
    assert plain and not [e for e in plain if "usage" in e]


def test_a_client_leaving_mid_stream_stops_the_aggregator(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "gpt-4.1", slow_stream={"rate": 1.0, "factor": 200})  # the aggregator streams slowly
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True}

    async def leave_after_first_text() -> None:
        async with (
            httpx.AsyncClient(timeout=60) as c,
            c.stream("POST", url + "/v1/chat/completions", json=body) as r,
        ):
            async for line in r.aiter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    return  # closes the connection with the aggregator mid-answer

    asyncio.run(leave_after_first_text())
    stats = wait_until_sync(
        lambda: sim_stats(sim)["gpt-4.1"], lambda s: s["in_flight"] == 0, what="the aggregator released"
    )
    assert stats["cancelled"] == 1 and stats["completed"] == 0


def test_cluster_wide_tpm_holds_with_two_replicas(url: str, sim: SimulatorServer) -> None:
    """Three thousand tokens a minute for the account, whichever of two replicas serves."""
    body = {
        "model": "tokened/tokened-model",
        "messages": QUESTION,
        "max_tokens": 50,
        "moa": {"deadline_s": 1},
    }

    async def go() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=60) as c:
            t0 = time.monotonic()
            rs = await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=body) for _ in range(120)))
            return list(rs), time.monotonic() - t0

    responses, elapsed = asyncio.run(go())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 504}, statuses
    used = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    # What was spent fits the bucket, plus its refill while the burst ran, plus one call's
    # reservation (a call is admitted on its estimate and settled to its real usage after).
    one_call = max(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    assert used <= 3000 + 50 * (elapsed + 2) + one_call, (used, elapsed, statuses)
    assert statuses[200] < 120 and statuses[429] + statuses[504] > 0  # the budget did refuse
    # A call sent just before its request's deadline may complete after the client got a 504.
    reached = wait_until_sync(
        lambda: sim_stats(sim)["tokened-model"], lambda m: m["in_flight"] == 0, what="calls finished"
    )
    assert statuses[200] <= reached["requests"]
    per_replica = answered_by_replica("provider-tokened", replicas=2)
    assert all(n > 0 for n in per_replica.values()), per_replica
    # Every answer the clients got was a call a replica answered; the provider may have finished a
    # few more whose replica had cut them first (their one-second deadline passed as the answer
    # crossed), as in the RPM test.
    assert statuses[200] <= sum(per_replica.values()) <= reached["completed"], (per_replica, reached)


# -- the module's own apps: tight (a small admission cap, quick circuits) and keyed (real-API mode) ---


@pytest.fixture(scope="module")
def own_apps(cluster: dict[str, Any], simulator: SimulatorServer) -> Iterator[dict[str, str]]:
    """The module's two apps of their own, deployed at once (their replicas start side by side,
    where one after the other each waited for the last): ``tight`` and ``keyed``; their prefixes.

    ``tight``: two requests in progress per ingress and circuits that open at the first failure,
    with its own provider replicas, so open circuits there leave the main app alone.

    ``keyed``: real-API mode on Ray (keys from the environment, providers at the simulator's
    address), with a key every provider refuses (conftest's LEAK_CHECK_KEY)."""
    from moa_actors.app import build_from_config
    from tests.conftest import LEAK_CHECK_ENV

    tight = trimmed_config(cluster["config"])
    for p in tight["providers"].values():
        p["circuit_breaker"] = {"failure_threshold": 1, "cooldown_s": 600}
        p["retry"] = {"max_attempts": 1}
    tight["server"]["max_concurrent_requests"] = 2
    keyed = trimmed_config(cluster["config"])
    for p in keyed["providers"].values():
        p["api_key_env"] = LEAK_CHECK_ENV
        p["base_url"] = simulator.url + ("/v1" if p["kind"] == "openai" else "")
    keyed["simulator"] = {"mode": "off"}
    serve.run_many(
        [
            serve.RunTarget(
                build_from_config(parse_config(raw, f"the {name} config")), name=name, route_prefix=f"/{name}"
            )
            for name, raw in (("tight", tight), ("keyed", keyed))
        ]
    )
    try:
        yield {"tight": "/tight", "keyed": "/keyed"}
    finally:
        delete_app("tight")
        delete_app("keyed")


@pytest.fixture
def tight(own_apps: dict[str, str]) -> str:
    return own_apps["tight"]


def test_admission_cap_is_429_on_ray(url: str, tight: str, sim: SimulatorServer) -> None:
    set_fault(sim, "gpt-4.1-mini", hang={"rate": 1.0})  # `single` answers with gpt-4.1-mini
    body = {"model": "single", "messages": QUESTION, "moa": {"deadline_s": 60}}
    model = "gpt-4.1-mini"
    endpoint = f"{url}{tight}/v1/chat/completions"

    async def scenario() -> tuple[int, str, int]:
        async with httpx.AsyncClient(timeout=90) as c:
            held = [asyncio.create_task(c.post(endpoint, json=body)) for _ in range(2)]
            await wait_until(
                lambda: sim_stats(sim).get(model, {}).get("in_flight", 0),
                lambda n: n == 2,
                what="two requests held at the provider",
            )
            third = await c.post(endpoint, json=body)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return third.status_code, third.headers.get("retry-after", ""), sim_stats(sim)[model]["requests"]

    status, retry_after, requests = asyncio.run(scenario())
    assert status == 429 and retry_after == "1"
    assert requests == 2  # the refused request never reached a provider


def test_every_circuit_open_is_503_through_the_health_board(
    url: str, tight: str, sim: SimulatorServer
) -> None:
    set_fault(sim, "*", error_500={"rate": 1.0})
    body = {"model": "moa-lite", "messages": QUESTION}
    first = chat(url, body, tight)
    assert first.status_code == 502, first.text  # every provider failed: their circuits open

    def health() -> dict[str, Any]:
        return httpx.get(f"{url}{tight}/healthz", headers=ADMIN_HEADERS).json()

    def opening() -> dict[str, Any]:
        """The board; a provider whose circuit is still closed is called directly, and fails. Its
        call in the first request may have been cut rather than failed: once two proposers had
        failed, moa-lite's quorum was out of reach and the layer cut the third (neutral to its
        breaker)."""
        board = health()
        for name, p in board["providers"].items():
            if p["state"] == "closed":
                chat(url, {"model": f"{name}/{MODELS[name]}", "messages": QUESTION}, tight)
        return board

    # Provider replicas report to the health board; the ingress routes from its view.
    board = wait_until_sync(opening, lambda h: h["status"] == "down", interval=0.2, what="every circuit open")
    assert {p["state"] for p in board["providers"].values()} == {"open"}
    before = sum(m["requests"] for m in sim_stats(sim).values())
    # Until the ingress's copy of the board (refreshed every 0.5 s) has it, a request still goes
    # to the replicas and their open circuits refuse it (also a 503, all_providers_failed); once
    # it has, the router refuses before any call.
    r = wait_until_sync(
        lambda: chat(url, body, tight),
        lambda r: r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_provider",
        interval=0.2,
        what="a 503 from the router's view of the board",
    )
    assert int(r.headers["retry-after"]) > 1
    assert sum(m["requests"] for m in sim_stats(sim).values()) == before  # nothing was sent


def _serve_logs() -> dict[str, str]:
    """Every Serve log file of this session's cluster, by name."""
    import glob
    import os

    logs = ray._private.worker._global_node.get_logs_dir_path()
    found = {}
    for path in glob.glob(os.path.join(logs, "serve", "*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            found[os.path.basename(path)] = f.read()
    return found


def test_every_request_and_call_logs_its_json_line_in_the_replica_logs(url: str) -> None:
    """In the throughput-optimised mode the test cluster runs in, as `moa serve` does."""
    r = chat(url, {"model": "moa-lite", "messages": QUESTION})
    assert r.status_code == 200
    trace_id = r.headers["x-moa-trace-id"]

    def lines() -> list[dict[str, Any]]:
        found = []
        for name, text in _serve_logs().items():
            for line in text.splitlines():
                if trace_id in line and line.startswith("{"):
                    found.append({**json.loads(line), "file": name})
        return found

    # One request line from the ingress, one per model call from the provider replicas.
    got = wait_until_sync(
        lines,
        lambda ls: (
            sum(x.get("event") == "provider_call" for x in ls) >= 4
            and any(x.get("event") == "request" for x in ls)
        ),
        interval=0.2,
        what="the request's JSON lines in the replica logs",
    )
    calls = [x for x in got if x.get("event") == "provider_call"]
    assert {x["model"] for x in calls} == {"gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1"}
    assert all("provider" in x["file"] for x in calls)
    (request,) = [x for x in got if x.get("event") == "request"]
    assert request["status"] == 200 and "ingress" in request["file"]
    # The health board is polled every 0.5 s: none of that reaches its log.
    from moa_actors.health_board import HEALTH_BOARD_NAME

    board_logs = [text for name, text in _serve_logs().items() if HEALTH_BOARD_NAME in name]
    assert board_logs and not any("health_view" in text for text in board_logs)


def test_a_refused_key_reaches_no_response_and_no_log_file(
    cluster: dict[str, Any], own_apps: dict[str, str], sim: SimulatorServer
) -> None:
    """Real-API mode on Ray (the ``keyed`` app), with a key every provider refuses: the simulator
    echoes it masked, as OpenAI does. Neither the key nor any piece of it reaches the response or
    any log file Ray writes."""
    import glob
    import os

    from tests.conftest import LEAK_CHECK_KEY

    body = {"model": "moa-lite", "messages": QUESTION, "moa": {"detail": True}}
    r = chat(str(cluster["url"]), body, own_apps["keyed"])
    assert r.status_code == 502 and "auth" in r.json()["error"]["message"], r.text
    # Every provider refused the key (typed auth from each API's own refusal).
    pieces = {LEAK_CHECK_KEY, LEAK_CHECK_KEY[-12:], LEAK_CHECK_KEY[:8] + "****"}
    assert not [p for p in pieces if p in r.text]
    logs = ray._private.worker._global_node.get_logs_dir_path()

    def leaks() -> list[str]:
        found = []
        for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    data = f.read()
                found += [f"{path}: {p}" for p in pieces if p.encode() in data]
        return found

    # The provider replicas have logged the failed calls (their auth errors) by now.
    wait_until_sync(
        lambda: sum(text.count('"error_kind": "auth"') for text in _serve_logs().values()),
        lambda n: n >= 4,
        interval=0.2,
        what="the failed calls logged",
    )
    assert leaks() == []
