"""The OpenAI-compatible HTTP API served in-process (uvicorn on loopback, no Ray), called with the
official ``openai`` client and raw HTTP for the malformed cases. The Ray tests reuse the same app."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from moa.simulator.server import SimulatorServer
from tests.helpers import QUESTION, ApiServer, set_fault, sim_in_flight, sim_stats, wait_idle
from tests.waiting import wait_until, wait_until_sync


@pytest.fixture
def api_url(sim: SimulatorServer) -> Iterator[str]:
    """A fresh API (fresh provider clients and circuit breakers) per test, on the shared simulator."""
    from moa.config import SimulatorMode, load_config

    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "server": cfg.server.model_copy(
                update={"max_request_bytes": 20_000, "max_concurrent_requests": 4}
            ),
        }
    )
    with ApiServer(cfg) as server:
        yield server.url


@pytest.fixture
def client(api_url: str, sim: SimulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_with_the_openai_client(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="moa-lite", messages=QUESTION)  # type: ignore[arg-type]
    assert completion.object == "chat.completion" and completion.model == "moa-lite"
    text = completion.choices[0].message.content or ""
    assert text.startswith("Synthesis of 3 references")
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert not (completion.model_extra or {}).get("moa")  # the breakdown is opt-in


def test_detail_extension_returns_every_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"moa": {"detail": True}},
    )
    detail = (completion.model_extra or {})["moa"]
    assert detail["preset"] == "moa-lite" and len(detail["calls"]) == 4
    assert sum(c["usage"]["input_tokens"] for c in detail["calls"]) == completion.usage.prompt_tokens  # type: ignore[union-attr]
    assert detail["totals"]["cost_usd"] > 0 and detail["answered_by"] == "openai/gpt-4.1"
    # Each answered call carries the service time its provider reported, within its latency; the
    # totals add them along the critical path (the layer's slowest, then the aggregator).
    calls = detail["calls"]
    assert all(0 < c["provider_service_s"] <= c["latency_s"] for c in calls if c["ok"])
    layer = [c["provider_service_s"] for c in calls if c["stage"] == "proposer" and c["ok"]]
    (final,) = [c for c in calls if c["stage"] == "aggregator"]
    path = max(layer) + final["provider_service_s"]
    assert detail["totals"]["provider_critical_path_s"] == pytest.approx(path)


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    text = "".join(parts)
    assert text.startswith("Synthesis of 3 references") and finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_direct_model_and_models_list(client: openai.OpenAI, sim: SimulatorServer) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"auto", "moa", "moa-lite", "self-moa", "refine", "single", "anthropic/claude-haiku-4-5"} <= ids
    completion = client.chat.completions.create(model="anthropic/claude-haiku-4-5", messages=QUESTION)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    # That one model answered, directly: one request, to it alone.
    assert {m: v["completed"] for m, v in sim_stats(sim).items()} == {"claude-haiku-4-5": 1}


HI = b'"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "start"),
    [
        (b"{not json", 400, "invalid_json", None, "request body is not valid JSON"),
        (b"[1, 2]", 400, "invalid_request", None, "request body must be a JSON object"),
        (b'{"model": "moa"}', 422, "invalid_value", "messages", "messages: Field required"),
        (b'{"model": "moa", "messages": []}', 422, "invalid_value", "messages", "messages: "),
        (
            b'{"model": "nope", ' + HI + b"}",
            404,
            "model_not_found",
            "model",
            "unknown preset or model 'nope'",
        ),
        (
            b'{"model": "moa", ' + HI + b', "temperature": 7}',
            422,
            "invalid_value",
            "temperature",
            "temperature: ",
        ),
        (b'{"model": "moa", ' + HI + b', "n": 0}', 422, "invalid_value", "n", "n: "),
        (
            b'{"model": "moa", "messages": [{"role": "wizard", "content": "hi"}]}',
            422,
            "invalid_value",
            "messages.0.role",
            "messages.0.role: ",
        ),
        (
            b'{"model": "moa", "messages": [{"role": "system", "content": "hi"}]}',
            400,
            "invalid_request",
            "messages",
            "messages must contain a user message",
        ),
        (
            b'{"model": "moa", ' + HI + b', "tools": [{"x": 1}]}',
            422,
            "invalid_value",
            "tools.0.type",
            "tools.0.type: Field required",
        ),
        (
            b'{"model": "moa", ' + HI + b', "moa": {"bogus": 1}}',
            422,
            "invalid_value",
            "moa.bogus",
            "moa.bogus: ",
        ),
    ],
)
def test_bad_requests_get_openai_style_errors(
    api_url: str, body: bytes, status: int, code: str, param: str | None, start: str
) -> None:
    """Each refusal names what was wrong: the field in ``param`` and at the start of the message.

    (A fragment such as "n" or "messages" anywhere in the message proved nothing: most messages
    contain it.)
    """
    r = httpx.post(
        api_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), error
    assert error["message"].startswith(start), error
    assert "Traceback" not in r.text


def test_oversized_body_is_refused(api_url: str) -> None:
    big = {"model": "moa", "messages": [{"role": "user", "content": "x" * 30_000}]}
    r = httpx.post(api_url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method(api_url: str) -> None:
    assert httpx.get(api_url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(api_url + "/v1/chat/completions").status_code == 405


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert err.value.code == "model_not_found"


def test_all_providers_down_is_a_clean_upstream_error(client: openai.OpenAI, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_500={"rate": 1.0})
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="moa-lite", messages=QUESTION)  # type: ignore[arg-type]
    assert err.value.status_code == 502
    assert "every provider failed" in err.value.message


def test_a_proposal_answers_when_every_aggregator_and_fallback_failed(
    api_url: str, sim: SimulatorServer
) -> None:
    """moa-lite's proposers answer; its aggregators and fallbacks all fail: the request is answered
    with the best proposal (the first in the layer's order), marked in the header and moa.detail,
    instead of a 502 that throws the three paid-for answers away."""
    for model in ("gpt-4.1", "claude-sonnet-4-6", "gemini-2.5-pro"):
        set_fault(sim, model, error_500={"rate": 1.0})
    body = {"model": "moa-lite", "messages": QUESTION, "moa": {"detail": True}}
    r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-moa-answer-source"] == "proposal"
    detail = r.json()["moa"]
    assert detail["answer_source"] == "proposal" and detail["fallback_reason"] == "aggregators_failed"
    assert detail["answered_by"] == "openai/gpt-4.1-mini"
    (mini,) = [c for c in detail["calls"] if c["model"] == "gpt-4.1-mini"]
    assert r.json()["choices"][0]["message"]["content"] and mini["ok"]


def test_a_stream_that_ends_in_an_error_is_logged_with_the_errors_status(
    api_url: str, sim: SimulatorServer
) -> None:
    """Its headers said 200 (sent once admitted); every provider then failed and the stream ended
    in an error event. The request's log line says 502 (and the 200 on the wire apart), not 200."""
    import io
    import json
    import logging

    from moa_observability.logs import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("moa.http")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        set_fault(sim, "*", error_500={"rate": 1.0})
        body = {"model": "moa-lite", "messages": QUESTION, "stream": True}
        with httpx.stream("POST", api_url + "/v1/chat/completions", json=body, timeout=60) as r:
            text = r.read().decode()
        assert r.status_code == 200 and '"error"' in text and text.rstrip().endswith("data: [DONE]")
        lines = wait_until_sync(
            lambda: [json.loads(x) for x in buf.getvalue().splitlines() if '"route"' in x],
            what="the request's log line",
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    (line,) = [x for x in lines if x["route"] == "/v1/chat/completions"]
    assert line["status"] == 502 and line["http_status"] == 200


def test_rate_limited_everywhere_is_429_with_retry_after(api_url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_429={"rate": 1.0, "retry_after_s": 60})
    r = httpx.post(api_url + "/v1/chat/completions", json={"model": "single", "messages": QUESTION})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1


def test_every_circuit_open_is_503_with_retry_after(api_url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_500={"rate": 1.0})
    body = {"model": "single", "messages": QUESTION}
    statuses = []
    for _ in range(8):  # each failed request opens the breakers a little further (threshold 5)
        r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=30)
        statuses.append(r.status_code)
        if r.status_code == 503:
            break
    assert statuses[0] == 502 and statuses[-1] == 503, statuses
    assert r.json()["error"]["code"] == "no_healthy_provider" and int(r.headers["retry-after"]) >= 1
    before = httpx.get(f"{sim.url}/admin/stats").json()["total_requests"]
    assert httpx.post(api_url + "/v1/chat/completions", json=body).status_code == 503
    assert httpx.get(f"{sim.url}/admin/stats").json()["total_requests"] == before  # nothing was sent
    assert httpx.get(api_url + "/healthz").status_code == 503


def test_deadline_gives_504(api_url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", hang={"rate": 1.0})
    # Nothing answers and the preset's own deadlines are over a minute: only the request's
    # deadline can end it, and the hanging calls must end with it.
    body = {"model": "moa-lite", "messages": QUESTION, "moa": {"deadline_s": 0.5}}
    r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    s = asyncio.run(wait_idle(sim))
    assert sum(m["requests"] for m in s.values()) == sum(m["cancelled"] for m in s.values()) == 3


def test_overload_gives_429(api_url: str, sim: SimulatorServer) -> None:
    """Past max_concurrent_requests (4) a request is refused at once; the slots come back after."""
    set_fault(sim, "*", hang={"rate": 1.0})  # admitted requests hold their slots until let go
    body = {"model": "single", "messages": QUESTION}
    url = api_url + "/v1/chat/completions"

    async def scenario() -> tuple[list[httpx.Response], int]:
        async with httpx.AsyncClient(timeout=60) as c:
            held = [asyncio.create_task(c.post(url, json=body)) for _ in range(4)]
            await wait_until(lambda: sim_in_flight(sim), lambda n: n == 4, what="four requests admitted")
            refused = await asyncio.gather(*(c.post(url, json=body) for _ in range(4)))
            for task in held:
                task.cancel()  # the client leaves: the service must let the slots go
            await asyncio.gather(*held, return_exceptions=True)
            await wait_idle(sim)
            (await c.delete(f"{sim.url}/admin/faults/*")).raise_for_status()
            after = await wait_until(
                lambda: c.post(url, json=body), lambda r: r.status_code != 429, what="a slot free again"
            )
            return refused, after.status_code

    refused, after = asyncio.run(scenario())
    assert [r.status_code for r in refused] == [429] * 4
    assert all(r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] for r in refused)
    assert after == 200
    # The refused requests never reached a provider.
    assert sum(m["requests"] for m in sim_stats(sim).values()) == 4 + 1


def test_open_streams_hold_their_admission_slots(api_url: str, sim: SimulatorServer) -> None:
    # The aggregator streams so slowly (10 tokens a second) that the streams stay open until the
    # client closes them: their slots are held for as long as the test needs.
    set_fault(sim, "gpt-4.1", slow_stream={"rate": 1.0, "factor": 200})
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True}
    single = {"model": "single", "messages": QUESTION}
    url = api_url + "/v1/chat/completions"

    async def scenario() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=60) as c:

            async def stream_one(text_arrived: asyncio.Event) -> None:
                async with c.stream("POST", url, json=body) as r:
                    async for line in r.aiter_lines():
                        if '"content": "' in line and '"content": ""' not in line:
                            text_arrived.set()  # the aggregator's text is flowing

            events = [asyncio.Event() for _ in range(4)]  # max_concurrent_requests is 4
            streams = [asyncio.create_task(stream_one(e)) for e in events]
            await asyncio.gather(*(e.wait() for e in events))
            during = await c.post(url, json=single)
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            after = await wait_until(
                lambda: c.post(url, json=single), lambda r: r.status_code != 429, what="a slot free again"
            )
            return during.status_code, after.status_code

    assert asyncio.run(scenario()) == (429, 200)
    s = asyncio.run(wait_idle(sim))
    assert s["gpt-4.1"]["cancelled"] == 4  # the four open streams, closed by their clients


def test_client_disconnect_cancels_the_fan_out(api_url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", hang={"rate": 1.0})
    body = {"model": "moa-lite", "messages": QUESTION}

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.create_task(c.post(api_url + "/v1/chat/completions", json=body))
            await wait_until(lambda: sim_in_flight(sim), lambda n: n == 3, what="the fan-out in flight")
            task.cancel()  # the client leaves
            await asyncio.gather(task, return_exceptions=True)
        return await wait_idle(sim)

    s = asyncio.run(scenario())
    assert sum(m["requests"] for m in s.values()) == sum(m["cancelled"] for m in s.values()) == 3


def test_explicit_plan_endpoint(api_url: str) -> None:
    plan = {
        "layers": [
            {
                "quorum": 2,
                "proposers": [
                    {"provider": "openai", "model": "gpt-4o-mini", "role": "critical"},
                    {"provider": "gemini", "model": "gemini-2.5-flash"},
                ],
            }
        ],
        "aggregators": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
    }
    r = httpx.post(api_url + "/v1/moa", json={"messages": QUESTION, "plan": plan}, timeout=20)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["text"].startswith("Synthesis of 2 references") and len(result["calls"]) == 3
    bad = {**plan, "aggregators": [{"provider": "openai", "model": "gpt-9"}]}
    r = httpx.post(api_url + "/v1/moa", json={"messages": QUESTION, "plan": bad})
    assert r.status_code == 422 and "no model 'gpt-9'" in r.json()["error"]["message"]
    r = httpx.post(api_url + "/v1/moa", json={"messages": QUESTION, "plan": {"aggregators": []}})
    assert r.status_code == 422


def test_healthz(api_url: str) -> None:
    r = httpx.get(api_url + "/healthz")
    # Per-provider detail is for the admin key (tests/test_secure_defaults.py); probes get the status.
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_every_answer_says_the_services_own_overhead(api_url: str) -> None:
    """``x-moa-overhead-ms``: the request's wall time at the service minus its wait on the model
    calls' critical path. It lies between the engine's own share (its wall time minus the critical
    path, both in the detail) and what the client saw minus the critical path."""
    import time

    for path, body in (
        ("/v1/chat/completions", {"model": "moa-lite", "messages": QUESTION, "moa": {"detail": True}}),
        ("/v1/moa", {"preset": "moa-lite", "messages": QUESTION}),
    ):
        t0 = time.monotonic()
        r = httpx.post(api_url + path, json=body, timeout=60)
        seen_ms = (time.monotonic() - t0) * 1000
        assert r.status_code == 200, r.text
        data = r.json()
        totals = data["moa"]["totals"] if "moa" in data else data
        critical_ms = totals["critical_path_s"] * 1000
        engine_ms = totals["wall_time_s"] * 1000 - critical_ms
        overhead = float(r.headers["x-moa-overhead-ms"])
        assert 0 < engine_ms <= overhead + 0.1 and overhead <= seen_ms - critical_ms, (engine_ms, overhead)
