"""Tool calling through the whole service, as agent clients send it: the official ``openai``
client against the in-process API (``moa serve --local``'s app) over the simulator, every provider
answering through its own native tool API. The Ray app and the agent frameworks are in
test_agents.py; the ensemble's decisions alone (vote, validation, chain) in test_engine_tools.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from moa.simulator.server import SimulatorServer
from tests.helpers import ApiServer

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture
def api_url(sim: SimulatorServer) -> Iterator[str]:
    from moa.config import SimulatorMode, load_config

    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})}
    )
    with ApiServer(cfg) as server:
        yield server.url


@pytest.fixture
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url + "/v1", api_key="unused", max_retries=0)


def weather_result(call_id: str) -> dict[str, Any]:
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "content": json.dumps({"temperature_c": 18, "sky": "clear"}),
    }


@pytest.mark.parametrize("preset", ["single", "moa-lite"])
def test_a_tool_call_and_its_result_make_an_agent_loop(client: openai.OpenAI, preset: str) -> None:
    """Call, run the tool, send its result, get the final answer: the loop every agent runs."""
    first = client.chat.completions.create(model=preset, messages=ASK, tools=[WEATHER, TIME])  # type: ignore[arg-type]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    history = [*ASK, choice.message.model_dump(exclude_none=True), weather_result(call.id)]
    final = client.chat.completions.create(model=preset, messages=history, tools=[WEATHER, TIME])  # type: ignore[arg-type]
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert "18" in (final.choices[0].message.content or "")  # it answered from the tool's result


@pytest.mark.parametrize("preset", ["single", "moa-lite"])
def test_a_streamed_tool_call_arrives_as_openai_streams_it(client: openai.OpenAI, preset: str) -> None:
    stream = client.chat.completions.create(
        model=preset,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                slot = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    slot["id"] = delta.id
                if delta.function and delta.function.name:
                    slot["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    slot["arguments"] += delta.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"])["city"] == "Paris"


def test_the_detail_shows_each_proposals_calls_and_the_vote(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="moa-lite",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        extra_body={"moa": {"detail": True}},
    )
    detail = r.model_extra["moa"]  # type: ignore[index]
    proposals = [c for c in detail["calls"] if c["stage"] == "proposer"]
    assert proposals and all(c["tool_calls"][0]["name"] == "get_weather" for c in proposals)
    assert detail["tool_vote"]["decided"] and detail["answer_source"] == "vote"
    assert not [c for c in detail["calls"] if c["stage"] == "aggregator"]  # no aggregator call


def test_aggregate_mode_and_tool_choice(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="moa-lite",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        extra_body={"moa": {"detail": True, "tools": "aggregate"}},
    )
    detail = r.model_extra["moa"]  # type: ignore[index]
    assert [c.function.name for c in r.choices[0].message.tool_calls or []] == ["get_time"]
    assert detail["answer_source"] == "aggregator"
    none = client.chat.completions.create(
        model="moa-lite",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",  # type: ignore[arg-type]
    )
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.content
    assert not none.choices[0].message.tool_calls


def test_legacy_functions_get_a_function_call_back(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="single",
        messages=ASK,  # type: ignore[arg-type]
        functions=[WEATHER["function"]],
    )
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather" and not choice.message.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": choice.message.function_call.model_dump()},
        {"role": "function", "name": "get_weather", "content": '{"temperature_c": 18}'},
    ]
    final = client.chat.completions.create(model="single", messages=history, functions=[WEATHER["function"]])  # type: ignore[arg-type]
    assert "18" in (final.choices[0].message.content or "")


def test_the_moa_endpoint_takes_tools_too(api_url: str) -> None:
    r = httpx.post(
        api_url + "/v1/moa",
        json={"preset": "moa-lite", "messages": ASK, "tools": [WEATHER], "tool_mode": "vote"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "tool_calls" and body["tool_calls"][0]["name"] == "get_weather"
    assert body["tool_vote"]["decided"]


UNANSWERED_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
}
NAMED_NOPE = {"type": "function", "function": {"name": "nope"}}
BAD_SCHEMA = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
MALFORMED: list[tuple[dict[str, Any], str, str]] = [
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
        "messages.[1].role",
        "Invalid parameter: messages with role 'tool'",
    ),
    (
        {"messages": [*ASK, UNANSWERED_CALL, {"role": "user", "content": "?"}]},
        "messages.[2].role",
        "An assistant message with 'tool_calls' must be followed by tool messages",
    ),
    ({"tool_choice": "required"}, "tool_choice", "Invalid value for 'tool_choice'"),
    (
        {"tools": [WEATHER], "tool_choice": NAMED_NOPE},
        "tool_choice",
        "Invalid value for 'tool_choice': function 'nope'",
    ),
    ({"tools": [BAD_SCHEMA]}, "tools.0.function.parameters", "Invalid schema for function 'f'"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "the function name 'get_weather' is declared"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "tool type 'web_search' is not supported"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "functions", "give either tools or"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "Invalid value for 'parallel_tool_calls'"),
]


@pytest.mark.parametrize(("extra", "param", "start"), MALFORMED)
def test_malformed_tool_requests_are_400s_naming_the_field(
    api_url: str, sim: SimulatorServer, extra: dict[str, Any], param: str, start: str
) -> None:
    body = {"model": "moa-lite", "messages": ASK, **extra}
    r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(start), error


def test_the_tool_definitions_count_against_a_cost_cap(api_url: str, sim: SimulatorServer) -> None:
    """The projection a cost cap is held to reads the tool definitions as prompt tokens: with a
    cap between the request's worst case without its tools and with them, it is refused (400
    ``over_cap``, nothing sent) only with them."""
    from moa.config import load_config
    from moa.engine.cost import project
    from moa.types import ChatMessage, GenerationParams, ToolSet, ToolSpec, priced_messages
    from tests.helpers import sim_total_requests

    config = load_config(None)
    tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "a long description " * 60}}
        for i in range(10)
    ]
    specs = ToolSet(
        tools=tuple(
            ToolSpec(name=t["function"]["name"], description=t["function"]["description"]) for t in tools
        )
    )
    question = [ChatMessage(role="user", content=ASK[0]["content"])]
    params = GenerationParams(max_tokens=50)
    bare = project(config, config.presets["moa-lite"], question, params).cost_usd
    heavy = project(config, config.presets["moa-lite"], priced_messages(question, specs), params).cost_usd
    assert heavy > 1.5 * bare
    cap = (bare + heavy) / 2
    body = {"model": "moa-lite", "messages": ASK, "max_tokens": 50, "moa": {"max_cost_usd": cap}}
    refused = httpx.post(api_url + "/v1/chat/completions", json=body | {"tools": tools}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "over_cap", refused.text
    assert sim_total_requests(sim) == 0
    assert httpx.post(api_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_rejected_answers_never_count_against_a_providers_health(api_url: str, sim: SimulatorServer) -> None:
    """Every model calls a function it was not offered: each request ends in a 502
    ``invalid_tool_calls``, as often as it is asked, and no circuit opens (five provider failures
    open one: tests/test_api.py::test_every_circuit_open_is_503_with_retry_after). The answers were
    the models' fault as answers, not their providers' as a service."""
    from tests.helpers import _admin

    profile = {"default": {"ttft_s": 0.0, "tokens_per_s": 2000.0, "tool_errors": {"wrong_function": 1.0}}}
    _admin(sim, "PUT", "/admin/profile", json=profile).raise_for_status()
    body = {"model": "single", "messages": ASK, "tools": [WEATHER]}
    for _ in range(8):
        r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "invalid_tool_calls", r.text
        assert "is not a declared function" in r.json()["error"]["message"]
    # Gemini's own verdict on a call it could not parse (MALFORMED_FUNCTION_CALL) comes through
    # its provider client as invalid_output: it, too, leaves the circuit closed.
    profile["default"]["tool_errors"] = {"malformed_json": 1.0}
    _admin(sim, "PUT", "/admin/profile", json=profile).raise_for_status()
    direct = body | {"model": "gemini/gemini-2.5-flash"}
    for _ in range(8):
        r = httpx.post(api_url + "/v1/chat/completions", json=direct, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "invalid_tool_calls", r.text
        # Still Gemini that answered: a circuit open would have had the router substitute it.
        assert "gemini/gemini-2.5-flash (direct): invalid_output" in r.json()["error"]["message"]
    health = httpx.get(api_url + "/healthz")
    assert health.status_code == 200, health.text
