"""Provider adapters: the official SDKs over loopback against the simulator, every fault kind."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from moa.config import MoAConfig, ProviderConfig, parse_config, resolve_endpoint
from moa.limits import ProviderLimits
from moa.providers.client import ProviderClient
from moa.providers.registry import ProviderPool, build_client
from moa.providers.wire import provider_service_time, redact_key
from moa.result import CallRecord, Stage
from moa.simulator.server import SimulatorServer
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    ErrorKind,
    GenerationParams,
    StreamEvent,
    TextDelta,
)
from tests.conftest import FAST_PROFILE, FAST_TOKENS_PER_S
from tests.helpers import clear_faults, model_stats, set_fault, sim_requests, wait_idle
from tests.waiting import wait_until

MODELS = {
    "openai": "gpt-4.1-mini",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.5-flash",
    "local": "llama-3.1-8b-instruct",
}
MESSAGES = (
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="What does a load balancer do?"),
)


def provider_config(sim_url: str, **overrides: Any) -> MoAConfig:
    """Four providers, one of each kind, with fast retries so fault tests stay quick."""
    common = {
        "timeout_s": 5,
        "retry": {"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
        "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 0.5},
        **overrides,
    }
    providers = {
        "openai": {"kind": "openai", "api_key_env": "OPENAI_API_KEY"},
        "anthropic": {"kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"},
        "gemini": {"kind": "gemini", "api_key_env": "GEMINI_API_KEY"},
        "local": {"kind": "openai_compatible", "base_url": "http://127.0.0.1:1/v1"},
    }
    raw = {
        "providers": {
            name: {
                **p,
                **common,
                "models": {
                    MODELS[name]: {
                        "input_per_mtok": 1.0,
                        "output_per_mtok": 4.0,
                        "cached_input_per_mtok": 0.5,
                    }
                },
            }
            for name, p in providers.items()
        },
        "simulator": {"mode": "on", "url": sim_url},
    }
    return parse_config(raw)


@pytest.fixture
async def pool(sim: SimulatorServer) -> AsyncIterator[ProviderPool]:
    async with ProviderPool.from_config(provider_config(sim.url), sim_url=sim.url) as p:
        yield p


def req(provider: str, **kw: Any) -> CallRequest:
    return CallRequest(provider=provider, model=MODELS[provider], messages=MESSAGES, **kw)


async def collect(stream: AsyncIterator[StreamEvent]) -> tuple[str, CallResult]:
    text, result = "", None
    async for ev in stream:
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            result = ev
    assert result is not None
    return text, result


async def both_ways(client: ProviderClient, req: CallRequest) -> list[tuple[str, CallResult]]:
    """The call sent plain, then streamed: (the text a client saw, the result) each."""
    plain = await client.complete(req)
    return [(plain.text, plain), await collect(client.stream(req))]


@pytest.mark.parametrize("provider", list(MODELS))
async def test_complete_normalises_every_provider(pool: ProviderPool, provider: str) -> None:
    res = await pool.call(req(provider))
    assert res.ok, res.error
    assert res.provider == provider and res.requested_model == MODELS[provider] and res.model
    assert res.text and res.finish_reason == "stop" and res.attempts == 1 and not res.streamed
    assert res.usage.input_tokens > 0 and res.usage.output_tokens > 0
    expected = (res.usage.input_tokens * 1.0 + res.usage.output_tokens * 4.0) / 1e6
    assert res.cost_usd == pytest.approx(expected)
    assert res.provider_service_s is not None and 0 < res.provider_service_s <= res.latency_s


def test_provider_service_time_prefers_the_exact_simulator_header() -> None:
    """The provider's own header, in whole ms; the simulator's, unrounded, wins when it is there
    (only the simulator sends both); anything unreadable is no report at all."""
    assert provider_service_time({"openai-processing-ms": "412"}) == pytest.approx(0.412)
    both = {"openai-processing-ms": "412", "x-simulator-service-ms": "411.637"}
    assert provider_service_time(both) == pytest.approx(0.411637)
    assert provider_service_time({"x-simulator-service-ms": "nan", "openai-processing-ms": "7"}) == 0.007
    for junk in ({}, None, {"openai-processing-ms": "soon"}, {"openai-processing-ms": "-3"}):
        assert provider_service_time(junk) is None


@pytest.mark.parametrize("provider", list(MODELS))
async def test_only_openai_wires_report_a_service_time_of_their_own(
    sim: SimulatorServer, pool: ProviderPool, provider: str
) -> None:
    """With only the headers the real APIs send, an OpenAI-wire call reports OpenAI's
    ``openai-processing-ms`` (whole ms, on the official SDK's response); Anthropic and Gemini,
    which report nothing of the kind, give None."""
    faithful = FAST_PROFILE.model_copy(update={"simulator_service_header": False})
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        reset = await admin.post("/admin/reset", json={"profile": faithful.model_dump(mode="json")})
        reset.raise_for_status()
    res = await pool.call(req(provider))
    assert res.ok, res.error
    if provider in ("anthropic", "gemini"):
        assert res.provider_service_s is None
        return
    assert res.provider_service_s is not None
    ms = res.provider_service_s * 1000
    assert ms == pytest.approx(round(ms), abs=1e-6)  # whole milliseconds: OpenAI's header, not ours
    # FAST_PROFILE: 20 ms to the first token, the prompt read at 10,000 tokens/s (the default),
    # then FAST_TOKENS_PER_S, no jitter.
    per_ms = FAST_TOKENS_PER_S / 1000
    expected = 20 + res.usage.input_tokens / 10 + res.usage.output_tokens / per_ms
    assert ms == pytest.approx(expected, abs=0.5 + 1e-6)
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sk-sim", max_retries=0)
    async with client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODELS["openai"], messages=[{"role": "user", "content": "Name a colour."}]
        )
    assert raw.headers["openai-processing-ms"].isdigit() and "x-simulator-service-ms" not in raw.headers
    usage = raw.parse().usage
    assert usage is not None
    # The prompt's read counts too (under a millisecond here, but it moves the rounding).
    expected = 20 + usage.prompt_tokens / 10 + usage.completion_tokens / per_ms
    assert abs(int(raw.headers["openai-processing-ms"]) - expected) <= 0.5


@pytest.mark.parametrize("provider", list(MODELS))
async def test_stream_matches_complete(pool: ProviderPool, provider: str) -> None:
    full = await pool.call(req(provider))
    text, res = await collect(pool.stream(req(provider)))
    assert res.ok and res.streamed and text == res.text == full.text  # deterministic simulator
    assert res.usage.output_tokens == full.usage.output_tokens
    assert res.ttft_s is not None and 0 < res.ttft_s <= res.latency_s


async def test_max_tokens_truncates_with_length(pool: ProviderPool) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        res = await pool.call(req(provider, params=GenerationParams(max_tokens=5)))
        assert res.ok and res.finish_reason == "length" and res.usage.output_tokens <= 5


async def test_429_retry_after_is_honoured(pool: ProviderPool, sim: SimulatorServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        set_fault(sim, MODELS[provider], error_429={"first_n": 1, "retry_after_s": 0.4})
        t0 = time.monotonic()
        res = await pool.call(req(provider))
        assert res.ok and res.attempts == 2, (provider, res.error)
        assert time.monotonic() - t0 >= 0.4


async def test_5xx_is_retried(pool: ProviderPool, sim: SimulatorServer) -> None:
    set_fault(sim, MODELS["anthropic"], error_503={"first_n": 2})
    res = await pool.call(req("anthropic"))
    assert res.ok and res.attempts == 3


async def test_retries_exhausted(pool: ProviderPool, sim: SimulatorServer) -> None:
    set_fault(sim, MODELS["gemini"], error_500={"rate": 1.0})
    res = await pool.call(req("gemini"))
    assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR and res.error.status_code == 500
    assert res.attempts == 3 and model_stats(sim, MODELS["gemini"])["requests"] == 3


async def test_retry_after_beyond_the_limit_fails_at_once(sim: SimulatorServer) -> None:
    cfg = provider_config(sim.url, retry={"max_attempts": 3, "max_retry_after_s": 1})
    async with ProviderPool.from_config(cfg, sim_url=sim.url) as pool:
        set_fault(sim, MODELS["openai"], error_429={"rate": 1.0, "retry_after_s": 30})
        # The call's own deadline would allow waiting the 30 s: only the limit refuses the wait.
        res = await pool.call(req("openai", timeout_s=60))
    assert res.error is not None and res.error.kind is ErrorKind.RATE_LIMITED and res.attempts == 1
    assert model_stats(sim, MODELS["openai"])["requests"] == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_hang_is_ended_by_the_deadline(pool: ProviderPool, sim: SimulatorServer, provider: str) -> None:
    set_fault(sim, MODELS[provider], hang={"rate": 1.0})
    res = await pool.call(req(provider, timeout_s=0.6))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT
    # One deadline for the call, retries included: the first attempt used all of it (a lower
    # bound: the wait happened), so no retry was sent; the hanging request was closed, not left.
    assert res.attempts == 1 and res.latency_s >= 0.6
    s = await wait_idle(sim, MODELS[provider])
    assert s["requests"] == s["cancelled"] == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("fault", ["malformed_json", "wrong_content_type"])
async def test_broken_bodies_are_malformed_response(
    pool: ProviderPool, sim: SimulatorServer, provider: str, fault: str
) -> None:
    set_fault(sim, MODELS[provider], **{fault: {"rate": 1.0}})
    res = await pool.call(req(provider))
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE, res.error
    assert res.attempts == 1  # not retried: a broken body is not a transient failure
    _, streamed = await collect(pool.stream(req(provider)))
    assert streamed.error is not None and streamed.error.kind is ErrorKind.MALFORMED_RESPONSE


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_cut_stream_is_malformed_after_some_text(
    pool: ProviderPool, sim: SimulatorServer, provider: str
) -> None:
    set_fault(sim, MODELS[provider], cut_stream={"rate": 1.0})
    text, res = await collect(pool.stream(req(provider)))
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert text and res.text == text and res.attempts == 1  # text was out: never retried


async def test_invalid_key_is_auth_and_not_retried(sim: SimulatorServer) -> None:
    # Long enough that OpenAI's masked echo keeps a head and a tail of it, as for a real key.
    key = "sim-invalid-key-" + secrets.token_hex(12)
    cfg = provider_config(sim.url)
    for provider in ("openai", "anthropic", "gemini"):
        endpoint = resolve_endpoint(cfg, provider, sim_url=sim.url)
        endpoint = endpoint.model_copy(update={"api_key": type(endpoint.api_key)(key)})
        client = build_client(provider, cfg.providers[provider], endpoint)
        try:
            res = await client.complete(req(provider))
        finally:
            await client.aclose()
        assert res.error is not None and res.error.kind is ErrorKind.AUTH and res.attempts == 1
        for fragment in (key, key[:8], key[-4:], "***" + key[-4:]):
            assert fragment not in res.error.message, (provider, res.error.message)
    # The simulator does echo part of the key, as OpenAI does: the check above could fail.
    body = {"model": MODELS["openai"], "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post(f"{sim.url}/v1/chat/completions", headers=auth, json=body)
    assert r.status_code == 401 and key[:8] in r.text and key[-4:] in r.text


def test_a_masked_key_is_redacted_whatever_the_api_shows_of_it() -> None:
    key = "sk-proj-" + "Q7vX2mN9pL4kR8sT1wY6abcd"
    for echoed in (
        "Incorrect API key provided: sk-proj-********************abcd.",  # OpenAI's mask
        "Incorrect API key provided: sk-...abcd.",  # an ellipsis mask
        "key sk-proj-\u2022\u2022\u2022\u2022abcd refused",  # bullets
        "the key ending in abcd was revoked",  # the tail alone
        f"Bearer {key} is not valid",  # the whole key
    ):
        redacted = redact_key(echoed, key)
        assert "***" in redacted and not any(f in redacted for f in ("abcd", "Q7vX", "\u2022", "****")), (
            redacted
        )
    assert redact_key("Please try again later... thanks", key) == "Please try again later... thanks"
    assert (
        redact_key("Incorrect API key provided: sk-proj-****abcd.", None)
        == "Incorrect API key provided: ***."
    )


async def test_missing_key_names_the_variable_and_never_a_value(sim: SimulatorServer) -> None:
    cfg = provider_config(sim.url).model_copy(
        update={
            "simulator": parse_config(
                {"providers": {"x": {"kind": "openai", "models": {"m": {}}}}, "simulator": {"mode": "off"}}
            ).simulator
        }
    )
    env = {"ANTHROPIC_API_KEY": "sk-ant-secret-value-123"}
    async with ProviderPool.from_config(cfg, env=env) as pool:
        res = await pool.call(req("openai"))
        assert res.error is not None and res.error.kind is ErrorKind.AUTH and res.attempts == 0
        assert "OPENAI_API_KEY" in res.error.message
        anthropic = pool.clients["anthropic"]
        for text in (repr(anthropic.endpoint), str(anthropic.endpoint), str(anthropic.health())):
            assert "sk-ant-secret-value-123" not in text


@pytest.mark.parametrize("stream", [False, True])
async def test_cancellation_closes_the_request(
    pool: ProviderPool, sim: SimulatorServer, stream: bool
) -> None:
    set_fault(sim, MODELS["openai"], hang={"rate": 1.0})

    async def run() -> Any:
        return await collect(pool.stream(req("openai"))) if stream else await pool.call(req("openai"))

    task = asyncio.create_task(run())
    await wait_until(
        lambda: model_stats(sim, MODELS["openai"])["in_flight"], lambda n: n == 1, what="the call in flight"
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    s = await wait_idle(sim, MODELS["openai"])
    assert s["requests"] == s["cancelled"] == 1
    assert pool.clients["openai"].limits.in_flight == 0


async def test_circuit_breaker_opens_refuses_and_probes(pool: ProviderPool, sim: SimulatorServer) -> None:
    model = MODELS["anthropic"]
    set_fault(sim, model, error_500={"rate": 1.0})
    client = pool.clients["anthropic"]
    for _ in range(3):  # each call fails after its retries: one breaker failure per call
        res = await client.complete(req("anthropic"))
        assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR
    assert client.health()["state"] == "open"
    sent = model_stats(sim, model)["requests"]
    refused = await client.complete(req("anthropic"))
    assert (
        refused.error is not None and refused.error.kind is ErrorKind.CIRCUIT_OPEN and refused.attempts == 0
    )
    assert model_stats(sim, model)["requests"] == sent  # nothing was sent
    # After the cool-down the next call is the half-open probe.
    await wait_until(lambda: client.health()["state"], lambda st: st == "half_open", what="half-open")
    clear_faults(sim, model)
    probe = await client.complete(req("anthropic"))
    assert probe.ok and client.health()["state"] == "closed"


async def test_a_callers_short_deadline_does_not_open_the_circuit(
    pool: ProviderPool, sim: SimulatorServer
) -> None:
    set_fault(sim, MODELS["gemini"], hang={"rate": 1.0})
    client = pool.clients["gemini"]
    for _ in range(4):  # the threshold is 3: a provider timeout would have opened it
        res = await client.complete(req("gemini", timeout_s=0.1))
        assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT
    assert client.health()["state"] == "closed"


async def test_concurrency_limit_caps_in_flight_calls(sim: SimulatorServer) -> None:
    cfg = provider_config(sim.url, limits={"concurrency": 2})
    set_fault(sim, MODELS["openai"], hang={"rate": 1.0, "hang_s": 0.3})
    async with ProviderPool.from_config(cfg, sim_url=sim.url) as pool:
        limits = pool.clients["openai"].limits
        results = await asyncio.gather(*(pool.call(req("openai")) for _ in range(6)))
    assert all(r.ok for r in results)
    # Both slots were taken (the first two calls take them before either can finish) and the
    # provider never saw more than two at once. (Whether the two calls actually overlapped at the
    # provider depends on how fast this machine sends them, so that count is a bound, not ==.)
    assert limits.max_in_flight == 2 and limits.in_flight == 0
    s = model_stats(sim, MODELS["openai"])
    assert s["requests"] == s["completed"] == 6 and s["max_in_flight"] <= 2


async def test_rpm_budget_delays_and_refuses(sim: SimulatorServer) -> None:
    cfg: ProviderConfig = provider_config(sim.url, limits={"rpm": 120}).providers["openai"]
    endpoint = resolve_endpoint(provider_config(sim.url), "openai", sim_url=sim.url)
    client: ProviderClient = build_client("openai", cfg, endpoint, ProviderLimits.from_config(cfg))
    try:
        # Drain the burst (120) quickly via the budget itself, then one more must wait half a second.
        budget = client.limits.budget
        for _ in range(120):
            await budget.acquire(0, timeout_s=0)
        t0 = time.monotonic()
        res = await client.complete(req("openai"))
        assert res.ok and time.monotonic() - t0 >= 0.45
        refused = await client.complete(req("openai", timeout_s=0.2))
        assert refused.error is not None and refused.error.kind is ErrorKind.RATE_LIMITED
    finally:
        await client.aclose()


async def test_unknown_provider_is_a_bad_request(pool: ProviderPool) -> None:
    res = await pool.call(CallRequest(provider="nope", model="m", messages=MESSAGES))
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST


# -- the contract with each API: generation parameters --------------------------------------------------
# Every parameter goes through the real SDK over HTTP to the simulator, which checks it as the real API
# does; GET /admin/requests shows what arrived.

STOP = ("<no-such-marker>",)
# Every generation parameter each API accepts, in sets it accepts together (current Claude models take
# temperature or top_p, not both, and the Anthropic API has no seed).
CONTRACT: dict[str, list[GenerationParams]] = {
    "openai": [GenerationParams(temperature=0.4, top_p=0.9, max_tokens=64, stop=STOP, seed=7)],
    "local": [GenerationParams(temperature=0.4, top_p=0.9, max_tokens=64, stop=STOP, seed=7)],
    "gemini": [GenerationParams(temperature=0.4, top_p=0.9, max_tokens=64, stop=STOP, seed=7)],
    "anthropic": [
        GenerationParams(temperature=0.4, max_tokens=64, stop=STOP),
        GenerationParams(top_p=0.9, max_tokens=64, stop=STOP),
    ],
}


def sent_params(p: GenerationParams) -> dict[str, Any]:
    """The parameters as the simulator reports them (its names, lists for stop)."""
    out = p.model_dump(exclude_none=True)
    if "stop" in out:
        out["stop"] = list(out["stop"])
    return out


def refuse(sim: SimulatorServer, model: str, *params: str) -> None:
    """Make the simulated model answer 400 to these parameters, as a model that dropped them does."""
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    profile["models"][model] = {**profile["default"], "refuses": list(params)}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()


async def call(pool: ProviderPool, request: CallRequest, stream: bool) -> CallResult:
    return (await collect(pool.stream(request)))[1] if stream else await pool.call(request)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider", list(MODELS))
async def test_contract_every_accepted_parameter_reaches_the_api(
    pool: ProviderPool, sim: SimulatorServer, provider: str, stream: bool
) -> None:
    for params in CONTRACT[provider]:
        res = await call(pool, req(provider, params=params), stream)
        assert res.ok, (provider, res.error)
        assert res.adjustments == [] and res.attempts == 1 and res.streamed is stream
        (seen,) = sim_requests(sim)[-1:]
        assert seen["model"] == MODELS[provider] and seen["stream"] is stream and seen["refused"] is None
        assert seen["params"] == sent_params(params)


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_temperature_is_clamped_to_its_range_and_recorded(
    pool: ProviderPool, sim: SimulatorServer, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="moa.providers"):
        res = await call(pool, req("anthropic", params=GenerationParams(temperature=1.5)), stream)
    assert res.ok, res.error
    assert res.adjustments == ["temperature 1.5 clamped to 1.0 (Anthropic's range is 0-1)"]
    assert sim_requests(sim)[-1]["params"] == {"temperature": 1.0, "max_tokens": 1024}
    # Visible in the run's call records (moa.detail) and in the provider-call log line.
    record = CallRecord.from_result(res, stage=Stage.PROPOSER, started_s=0.0)
    assert record.model_dump(mode="json")["adjustments"] == res.adjustments
    (logged,) = [r for r in caplog.records if getattr(r, "event", None) == "provider_call"]
    assert getattr(logged, "adjustments", None) == res.adjustments


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_never_sends_temperature_with_top_p_nor_a_seed(
    pool: ProviderPool, sim: SimulatorServer, stream: bool
) -> None:
    # The simulator refuses the pair for claude-haiku-4-5, as the real API does for current models.
    params = GenerationParams(temperature=0.3, top_p=0.8, seed=5)
    res = await call(pool, req("anthropic", params=params), stream)
    assert res.ok and res.attempts == 1, res.error
    assert res.adjustments == [
        "seed dropped: the Anthropic API has no seed",
        "top_p dropped: claude-haiku-4-5 takes temperature or top_p, not both",
    ]
    assert sim_requests(sim)[-1]["params"] == {"temperature": 0.3, "max_tokens": 1024}


async def test_configured_unsupported_params_are_never_sent(sim: SimulatorServer) -> None:
    cfg = provider_config(sim.url).model_dump(mode="json")
    cfg["providers"]["openai"]["models"][MODELS["openai"]]["unsupported_params"] = ["temperature", "seed"]
    refuse(sim, MODELS["openai"], "temperature", "seed")  # a request carrying either would fail
    async with ProviderPool.from_config(parse_config(cfg), sim_url=sim.url) as pool:
        res = await pool.call(req("openai", params=GenerationParams(temperature=0.2, top_p=0.5, seed=1)))
    assert res.ok and res.attempts == 1, res.error
    assert res.adjustments == [
        "temperature dropped: refused by gpt-4.1-mini (per config)",
        "seed dropped: refused by gpt-4.1-mini (per config)",
    ]
    assert [r["params"] for r in sim_requests(sim)] == [{"top_p": 0.5}]


@pytest.mark.parametrize("provider", list(MODELS))
async def test_a_refused_parameter_is_learned_dropped_and_not_held_against_health(
    sim: SimulatorServer, provider: str
) -> None:
    # One retry at most and a breaker that opens at the first failure: the learned drop must
    # use neither.
    cfg = provider_config(sim.url, retry={"max_attempts": 1}, circuit_breaker={"failure_threshold": 1})
    model = MODELS[provider]
    refuse(sim, model, "temperature")
    note = f"temperature dropped: refused by {model} (learned from its 400)"
    params = GenerationParams(temperature=0.5, max_tokens=40)
    async with ProviderPool.from_config(cfg, sim_url=sim.url) as pool:
        first = await pool.call(req(provider, params=params))
        assert first.ok, first.error
        assert first.attempts == 2 and first.adjustments == [note]
        assert pool.clients[provider].health()["state"] == "closed"
        # Remembered for this model: later calls, streaming or not, never send it again.
        for stream in (False, True):
            again = await call(pool, req(provider, params=params), stream)
            assert again.ok and again.attempts == 1 and again.adjustments == [note], again.error
    refused = [(r["params"].get("temperature"), r["refused"] is not None) for r in sim_requests(sim)]
    assert refused == [(0.5, True), (None, False), (None, False), (None, False)]


async def test_an_anthropic_model_refusing_temperature_gets_top_p_instead(sim: SimulatorServer) -> None:
    # temperature wins over top_p when both are asked for; once the model refuses temperature,
    # top_p is what it gets.
    refuse(sim, MODELS["anthropic"], "temperature")
    async with ProviderPool.from_config(provider_config(sim.url), sim_url=sim.url) as pool:
        res = await pool.call(req("anthropic", params=GenerationParams(temperature=0.7, top_p=0.6)))
    assert res.ok and res.attempts == 2, res.error
    assert res.adjustments == ["temperature dropped: refused by claude-haiku-4-5 (learned from its 400)"]
    assert [r["params"] for r in sim_requests(sim)] == [
        {"temperature": 0.7, "max_tokens": 1024},
        {"top_p": 0.6, "max_tokens": 1024},
    ]


@pytest.mark.parametrize(("provider", "api", "limit"), [("openai", "OpenAI", 4), ("gemini", "Gemini", 5)])
async def test_stop_sequences_beyond_the_apis_limit_are_cut_and_recorded(
    pool: ProviderPool, sim: SimulatorServer, provider: str, api: str, limit: int
) -> None:
    stops = tuple(f"<stop{i}>" for i in range(7))
    res = await pool.call(req(provider, params=GenerationParams(stop=stops)))
    assert res.ok, res.error
    assert res.adjustments == [f"stop: kept the first {limit} of 7 sequences (the {api} API's limit)"]
    assert sim_requests(sim)[-1]["params"]["stop"] == list(stops[:limit])
