"""Several answers to one request (``n``), through the whole service as clients send it: the
official ``openai`` client against the in-process API (``moa serve --local``'s app) over the
simulator, whose counters say which models were called how often. The proposers run once; the
final answer is written ``n`` times, each its own call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from moa.config import CacheConfig, MoAConfig, StateConfig, load_config
from moa.engine.cost import project
from moa.simulator.server import SimulatorServer
from moa.types import ChatMessage, GenerationParams
from tests.helpers import (
    ApiServer,
    model_stats,
    set_fault,
    set_pace,
    sim_requests,
    sim_total_requests,
    simulated,
)
from tests.waiting import wait_until_sync

ASK = [{"role": "user", "content": "Name three uses of a paperclip."}]
PROPOSERS = ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash")  # moa-lite's
AGGREGATOR = "gpt-4.1"  # moa-lite's first aggregator


def capped(sim: SimulatorServer, **caps: Any) -> MoAConfig:
    """The simulated config with these caps changed."""
    cfg = simulated(sim)
    return cfg.model_copy(update={"caps": cfg.caps.model_copy(update=caps)})


def two_streamed(client: openai.OpenAI, n: int = 2, **moa: Any) -> openai.Stream[ChatCompletionChunk]:
    """Two answers (or ``n``) of moa-lite to ASK, streamed with usage and the detail (and these
    ``moa`` options)."""
    return client.chat.completions.create(
        model="moa-lite",
        messages=ASK,  # type: ignore[arg-type]
        n=n,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"moa": {"detail": True, **moa}},
    )


def detail_of(body: Any) -> dict[str, Any]:
    detail: dict[str, Any] = body.model_extra["moa"]
    return detail


def test_n_2_returns_two_choices_from_two_aggregator_calls_over_one_set_of_proposals(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="moa-lite",
        messages=ASK,  # type: ignore[arg-type]
        n=2,
        seed=7,
        temperature=0.8,
        extra_body={"moa": {"detail": True}},
    )
    r = raw.parse()
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "stop" and c.message.content for c in r.choices)
    # The proposers ran once each; the aggregator twice, each answer sampled with its own seed.
    assert [model_stats(sim, m)["requests"] for m in PROPOSERS] == [1, 1, 1]
    assert model_stats(sim, AGGREGATOR)["requests"] == 2
    seeds = sorted(q["params"].get("seed") for q in sim_requests(sim) if q["model"] == AGGREGATOR)
    assert seeds == [7, 8]
    # Every call is in the detail and the usage: the aggregator's, one per answer.
    detail = detail_of(r)
    finals = [c for c in detail["calls"] if c["stage"] == "aggregator"]
    assert sorted(c["choice"] for c in finals) == [0, 1]
    assert [c["index"] for c in detail["choices"]] == [0, 1]
    assert detail["totals"]["calls"] == 5
    assert r.usage is not None
    assert r.usage.completion_tokens == sum(c["usage"]["output_tokens"] for c in detail["calls"])
    assert r.usage.prompt_tokens == sum(c["usage"]["input_tokens"] for c in detail["calls"])
    cost = sum(c["cost_usd"] for c in detail["calls"])
    assert float(raw.headers["x-moa-cost-usd"]) == pytest.approx(cost, abs=1e-8) and cost > 0


def test_a_single_model_plan_makes_one_call_per_answer(client: openai.OpenAI, sim: SimulatorServer) -> None:
    r = client.chat.completions.create(model="single", messages=ASK, n=3)  # type: ignore[arg-type]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 3
    assert sim_total_requests(sim) == 3


def test_each_answer_streams_under_its_own_index_and_ends_with_its_own_finish(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    stream = two_streamed(client)
    text: dict[int, str] = {}
    finish: dict[int, list[str]] = {}
    roles: dict[int, str | None] = {}
    usage, detail = None, None
    for chunk in stream:
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish.setdefault(choice.index, []).append(choice.finish_reason)
        if chunk.usage is not None:
            usage, detail = chunk.usage, detail_of(chunk)
    assert sorted(text) == [0, 1] and all(text.values())
    assert roles == {0: "assistant", 1: "assistant"}  # each answer opens with its role chunk
    assert finish == {0: ["stop"], 1: ["stop"]}
    assert model_stats(sim, AGGREGATOR)["requests"] == 2
    assert usage is not None and detail is not None
    assert detail["totals"]["calls"] == 5
    assert usage.completion_tokens == sum(c["usage"]["output_tokens"] for c in detail["calls"])


def test_several_answers_run_a_staircase_as_final(client: openai.OpenAI, sim: SimulatorServer) -> None:
    """The staircase's steps write one answer: a request for two runs final, one call per answer."""
    stream = two_streamed(client, aggregation="staircase")
    (detail,) = [detail_of(chunk) for chunk in stream if chunk.usage is not None]
    assert detail["aggregation"] == "final"
    assert not [c for c in detail["calls"] if c["staircase_step"] is not None]
    assert model_stats(sim, AGGREGATOR)["requests"] == 2
    # The same request for one answer climbs the staircase: the number of answers made it final.
    (one,) = [detail_of(chunk) for chunk in two_streamed(client, n=1, aggregation="staircase") if chunk.usage]
    assert one["aggregation"] == "staircase"
    assert [c for c in one["calls"] if c["staircase_step"] is not None]


def test_several_answers_bypass_the_response_cache(sim: SimulatorServer, state_dir: Path) -> None:
    """A cached answer is one answer: n > 1 neither reads nor writes the answers' level."""
    cfg = simulated(
        sim, cache=CacheConfig(enabled=True, store="sqlite"), state=StateConfig(dir=str(state_dir))
    )
    with ApiServer(cfg) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(model="single", messages=ASK, n=2)  # type: ignore[arg-type]
            assert raw.headers["x-moa-cache"] == "bypass" and len(raw.parse().choices) == 2
        assert model_stats(sim, "gpt-4.1-mini")["requests"] == 4  # each answer written afresh
        # Nothing was stored for the one answer of n: 1 to find.
        raw = client.chat.completions.with_raw_response.create(model="single", messages=ASK)  # type: ignore[arg-type]
        assert raw.headers["x-moa-cache"] == "miss"


def test_n_past_the_cap_is_refused_naming_n_before_any_call(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """The default cap, 4, at its boundary: 4 answers are given, 5 refused before any call."""
    assert len(client.chat.completions.create(model="single", messages=ASK, n=4).choices) == 4  # type: ignore[arg-type]
    sent = sim_total_requests(sim)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="moa-lite", messages=ASK, n=5)  # type: ignore[arg-type]
    body: Any = refused.value.body
    assert body["param"] == "n" and "caps.max_n" in body["message"]
    assert sim_total_requests(sim) == sent


def test_the_call_cap_counts_every_answers_final_calls(sim: SimulatorServer) -> None:
    # moa-lite may make 3 proposer calls, then 2 aggregators and 2 fallbacks per answer: 7 for one
    # answer, 11 for two.
    with ApiServer(capped(sim, max_calls=10)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="moa-lite", messages=ASK).choices  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="moa-lite", messages=ASK, n=2)  # type: ignore[arg-type]
    assert "11 model calls" in str(refused.value) and "caps.max_calls" in str(refused.value)


def test_a_cost_cap_counts_every_answer(client: openai.OpenAI, sim: SimulatorServer) -> None:
    """A cap between the worst cases of one answer and of three admits the one and refuses the three."""
    cfg = load_config(None)
    plan = cfg.presets["moa-lite"].as_run(None, stream=False)
    messages = [ChatMessage(role="user", content=ASK[0]["content"])]
    params = GenerationParams(max_tokens=100)
    one, three = (project(cfg, plan, messages, params, n).cost_usd for n in (1, 3))
    assert three > one
    cap = {"moa": {"max_cost_usd": (one + three) / 2}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="moa-lite", messages=ASK, n=3, max_tokens=100, extra_body=cap)  # type: ignore[arg-type]
    body: Any = refused.value.body
    assert body["param"] == "moa.max_cost_usd"
    assert sim_total_requests(sim) == 0
    r = client.chat.completions.create(model="moa-lite", messages=ASK, n=1, max_tokens=100, extra_body=cap)  # type: ignore[arg-type]
    assert len(r.choices) == 1


def test_logprobs_stay_refused_with_their_reason(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="moa-lite", messages=ASK, n=2, logprobs=True)  # type: ignore[arg-type]
    body: Any = refused.value.body
    assert body["param"] == "logprobs" and "no token log probabilities" in body["message"]


def test_n_with_tools_is_refused_naming_n(client: openai.OpenAI, sim: SimulatorServer) -> None:
    tool: Any = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="moa-lite", messages=ASK, n=2, tools=[tool])  # type: ignore[arg-type]
    body: Any = refused.value.body
    assert body["param"] == "n" and "tools" in body["message"]
    assert sim_total_requests(sim) == 0


def test_each_answer_has_its_own_fallback_chain(api_url: str, sim: SimulatorServer) -> None:
    """The first aggregator call breaks (not retried): that answer moves on to the next model of
    its chain, the other keeps its own."""
    set_fault(sim, AGGREGATOR, malformed_json={"first_n": 1})
    plan = {
        "aggregators": [
            {"provider": "openai", "model": AGGREGATOR},
            {"provider": "anthropic", "model": "claude-haiku-4-5"},
        ]
    }
    r = httpx.post(f"{api_url}/v1/moa", json={"messages": ASK, "plan": plan, "n": 2}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert sorted(c["model"] for c in body["choices"]) == ["claude-haiku-4-5", AGGREGATOR]
    assert len(body["calls"]) == 3 and sum(not c["ok"] for c in body["calls"]) == 1


def test_an_answer_whose_chain_fails_fails_the_request(api_url: str, sim: SimulatorServer) -> None:
    set_fault(sim, AGGREGATOR, malformed_json={"first_n": 1})
    plan = {"aggregators": [{"provider": "openai", "model": AGGREGATOR}]}
    r = httpx.post(f"{api_url}/v1/moa", json={"messages": ASK, "plan": plan, "n": 2}, timeout=30)
    assert r.status_code == 502, r.text
    assert model_stats(sim, AGGREGATOR)["requests"] == 2


def test_a_client_that_leaves_cancels_every_answer(client: openai.OpenAI, sim: SimulatorServer) -> None:
    set_pace(sim, ttft_s=0.05, tokens_per_s=10)
    stream = client.chat.completions.create(model="single", messages=ASK, n=2, stream=True)  # type: ignore[arg-type]
    for chunk in stream:
        if any(c.delta.content for c in chunk.choices):
            break
    stream.close()
    stats = wait_until_sync(
        lambda: model_stats(sim, "gpt-4.1-mini"), lambda s: s["in_flight"] == 0, what="both answers ended"
    )
    assert stats["requests"] == 2 and stats["cancelled"] == 2 and stats["completed"] == 0
