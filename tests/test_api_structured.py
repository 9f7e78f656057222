"""Structured outputs through the whole service, as clients ask for them: the official ``openai``
client's ``parse`` and ``stream`` with a pydantic model, LangChain's ``with_structured_output``,
and raw bodies, against the in-process API (``moa serve --local``'s app) over the simulator.

The models are asked for the format natively (``CallRequest.response_format``) and in their
prompt; the simulated models follow either, and their profile's ``json_errors`` make them write
broken or off-schema documents, which validation must stop. The chains that must fail here use
OpenAI models under a non-strict format: the only kind of format whose decoding is not held to
the schema (Anthropic's and Gemini's always are, as OpenAI's strict one), so these tests hold
whether or not an adapter sends the format natively. The ensemble's decisions alone are in
test_engine_structured.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from moa.config import CacheConfig, StateConfig, load_config
from moa.simulator.server import SimulatorServer
from tests.helpers import ApiServer, _admin, sim_total_requests, simulated

ASK = [{"role": "user", "content": "What is the weather in Paris today?"}]


class Weather(BaseModel):
    city: str
    sky: Literal["clear", "cloudy", "rain"]
    temperature_c: float
    summary: str


# A format a simulated OpenAI model may get wrong: its decoding is not held to the schema.
LOOSE = {
    "type": "json_schema",
    "json_schema": {
        "name": "weather",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "temperature_c": {"type": "number"}},
            "required": ["city", "temperature_c"],
        },
        "strict": False,
    },
}
# An explicit plan whose answering models are all OpenAI's.
OPENAI_ONLY: dict[str, Any] = {
    "layers": [
        {
            "quorum": 2,
            "proposers": [
                {"provider": "openai", "model": "gpt-4.1-mini"},
                {"provider": "anthropic", "model": "claude-haiku-4-5"},
                {"provider": "gemini", "model": "gemini-2.5-flash"},
            ],
        }
    ],
    "aggregators": [
        {"provider": "openai", "model": "gpt-4.1"},
        {"provider": "openai", "model": "gpt-4o-mini"},
    ],
    "fallbacks": [{"provider": "openai", "model": "gpt-4.1-mini"}],
    "on_aggregators_failed": "fallbacks",
}
FAST = {"ttft_s": 0.0, "tokens_per_s": 2000.0}


def erring(sim: SimulatorServer, **models: dict[str, float]) -> None:
    """Each named model writes its documents wrong at these rates (``JsonErrors``)."""
    profile = {
        "default": FAST,
        "models": {name: {**FAST, "json_errors": rates} for name, rates in models.items()},
    }
    _admin(sim, "PUT", "/admin/profile", json=profile).raise_for_status()


def moa(api_url: str, **body: Any) -> httpx.Response:
    return httpx.post(api_url + "/v1/moa", json={"messages": ASK, **body}, timeout=60)


@pytest.mark.parametrize("preset", ["single", "moa-lite", "moa"])
def test_parse_returns_the_pydantic_object(client: openai.OpenAI, preset: str) -> None:
    r = client.chat.completions.parse(model=preset, messages=ASK, response_format=Weather)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert isinstance(message.parsed, Weather) and message.parsed.city == "Paris", message
    assert message.refusal is None and r.choices[0].finish_reason == "stop"


def test_a_streamed_parse_gets_the_whole_valid_document(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="moa-lite", messages=ASK, response_format=Weather) as stream:  # type: ignore[arg-type]
        pieces = [ev.delta for ev in stream if ev.type == "content.delta"]
        final = stream.get_final_completion()
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.city == "Paris"
    assert len(pieces) > 1 and "".join(pieces) == final.choices[0].message.content


def test_langchain_with_structured_output(api_url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="moa-lite", base_url=api_url + "/v1", api_key="unused", max_retries=0)  # type: ignore[arg-type]
    answer = llm.with_structured_output(Weather).invoke("What is the weather in Paris today?")
    assert isinstance(answer, Weather) and answer.city == "Paris"


def test_json_object_mode_and_the_moa_endpoint(client: openai.OpenAI, api_url: str) -> None:
    r = client.chat.completions.create(
        model="moa-lite", messages=ASK, response_format={"type": "json_object"}, stream=True
    )  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert isinstance(json.loads(text), dict)
    body = moa(api_url, preset="moa-lite", response_format=LOOSE)
    assert body.status_code == 200, body.text
    assert json.loads(body.json()["text"])["city"] == "Paris"


def test_an_invalid_document_goes_to_the_next_aggregator(api_url: str, sim: SimulatorServer) -> None:
    """The first aggregator writes broken JSON: it is rejected (``invalid_output``, its parse error
    in the detail) and the second aggregator's valid document is the answer."""
    erring(sim, **{"gpt-4.1": {"malformed_json": 1.0}})
    r = moa(api_url, plan=OPENAI_ONLY, response_format=LOOSE)
    assert r.status_code == 200, r.text
    result = r.json()
    assert json.loads(result["text"])["city"] == "Paris" and result["model"] == "gpt-4o-mini"
    first = next(c for c in result["calls"] if c["stage"] == "aggregator" and c["model"] == "gpt-4.1")
    assert first["error_kind"] == "invalid_output"
    assert "the answer is not valid JSON" in first["error_message"], first
    assert any("gpt-4.1: answer rejected: the answer is not valid JSON" in n for n in result["notes"])


def test_when_every_document_is_invalid_the_client_gets_a_clean_502(
    api_url: str, sim: SimulatorServer
) -> None:
    """Every model that may answer writes off-schema or broken documents: a 502
    ``invalid_structured_output`` naming each failure, as often as asked, and no circuit opens."""
    erring(
        sim,
        **{"gpt-4.1": {"schema_violation": 1.0}, "gpt-4o-mini": {"malformed_json": 1.0}},
        **{"gpt-4.1-mini": {"malformed_json": 1.0}},
    )
    for _ in range(6):
        r = moa(api_url, plan=OPENAI_ONLY, response_format=LOOSE)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_structured_output", error
        assert "openai/gpt-4.1 (aggregator): invalid_output" in error["message"]
        assert (
            "openai/gpt-4o-mini (aggregator): invalid_output (the answer is not the JSON document"
            in error["message"]
        )
        assert "not valid JSON" in error["message"] and "is a required property" in error["message"]
    assert httpx.get(api_url + "/healthz").status_code == 200


def test_proposers_asked_for_the_format_vote_without_an_aggregator(
    api_url: str, sim: SimulatorServer
) -> None:
    city = {
        "type": "json_schema",
        "json_schema": {
            "name": "place",
            # As every wire takes it natively (Anthropic's asks for additionalProperties: false).
            "schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    r = moa(api_url, plan=OPENAI_ONLY | {"structured": "proposers"}, response_format=city)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["answer_source"] == "vote" and json.loads(result["text"]) == {"city": "Paris"}
    assert result["document_vote"]["decided"] and result["document_vote"]["agreed"] >= 2
    assert not [c for c in result["calls"] if c["stage"] == "aggregator"]


def test_the_cache_key_holds_the_schema(sim: SimulatorServer, state_dir: Path) -> None:
    cfg = simulated(
        sim, cache=CacheConfig(enabled=True, store="sqlite"), state=StateConfig(dir=str(state_dir))
    )
    with ApiServer(cfg) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        class Place(BaseModel):
            city: str

        def ask(fmt: Any) -> str:
            raw = client.chat.completions.with_raw_response.parse(
                model="moa-lite", messages=ASK, response_format=fmt
            )  # type: ignore[arg-type]
            assert isinstance(raw.parse().choices[0].message.parsed, fmt)
            return raw.headers["x-moa-cache"]

        assert [ask(Weather), ask(Weather), ask(Place), ask(Place)] == [
            "miss",
            "hit-exact",
            "miss",
            "hit-exact",
        ]
        plain = client.chat.completions.with_raw_response.create(model="moa-lite", messages=ASK)  # type: ignore[arg-type]
        assert plain.headers["x-moa-cache"] == "miss"  # a free-text answer is not a document's


def test_the_schema_counts_against_a_cost_cap(api_url: str, sim: SimulatorServer) -> None:
    """A cap between the request's worst case without its schema and with it: refused (400
    ``over_cap``, nothing sent) only with it."""
    from moa.engine.cost import project
    from moa.types import ChatMessage, GenerationParams, ResponseFormat, priced_messages

    cfg = load_config(None)
    properties = {
        f"field_{i}": {"type": "string", "description": "a long description " * 20} for i in range(30)
    }
    schema = {"type": "object", "properties": properties}
    fmt = ResponseFormat(type="json_schema", name="big", schema=schema)
    question = [ChatMessage(role="user", content=ASK[0]["content"])]
    params = GenerationParams(max_tokens=50)
    bare = project(cfg, cfg.presets["moa-lite"], question, params).cost_usd
    heavy = project(cfg, cfg.presets["moa-lite"], priced_messages(question, None, fmt), params).cost_usd
    assert heavy > 1.5 * bare
    body = {
        "model": "moa-lite",
        "messages": ASK,
        "max_tokens": 50,
        "moa": {"max_cost_usd": (bare + heavy) / 2},
    }
    big = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    refused = httpx.post(api_url + "/v1/chat/completions", json=body | {"response_format": big}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "over_cap", refused.text
    assert sim_total_requests(sim) == 0
    assert httpx.post(api_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def fmt(**json_schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": json_schema}


SCHEMA = {"type": "object"}
MALFORMED: list[tuple[Any, str, str]] = [
    ("json", "response_format", "Invalid type for 'response_format'"),
    ({"type": "xml"}, "response_format.type", "Invalid value: 'xml'. Supported values are"),
    ({"type": "json_schema"}, "response_format.json_schema", "Missing required parameter"),
    (fmt(schema=SCHEMA), "response_format.json_schema.name", "Missing required parameter"),
    (
        fmt(name="a b", schema=SCHEMA),
        "response_format.json_schema.name",
        "Invalid 'response_format.json_schema",
    ),
    (
        fmt(name="x" * 65, schema=SCHEMA),
        "response_format.json_schema.name",
        "Invalid 'response_format.json_schema",
    ),
    (fmt(name="w"), "response_format.json_schema.schema", "'response_format.json_schema.schema' must be"),
    (fmt(name="w", schema={"type": "objekt"}), "response_format.json_schema.schema", "Invalid schema for"),
    (fmt(name="w", schema=SCHEMA, strict="yes"), "response_format.json_schema.strict", "Invalid type"),
    (fmt(name="w", schema=SCHEMA, format="x"), "response_format.json_schema.format", "Unrecognized"),
    ({"type": "json_object", "json_schema": {}}, "response_format.json_schema", "Unrecognized"),
]


@pytest.mark.parametrize(("value", "param", "start"), MALFORMED)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/moa"])
def test_malformed_formats_are_400s_naming_the_field(
    api_url: str, sim: SimulatorServer, value: Any, param: str, start: str, endpoint: str
) -> None:
    body = {"messages": ASK, "response_format": value} | (
        {"model": "moa-lite"} if endpoint == "/v1/chat/completions" else {"preset": "moa-lite"}
    )
    r = httpx.post(api_url + endpoint, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(start), error
    assert sim_total_requests(sim) == 0


REFUSAL = "I'm sorry, I cannot assist with that request."


async def test_a_refusal_reaches_the_client_as_message_refusal() -> None:
    """A model's refusal (``CallResult.refusal``, which each adapter fills from its API's own
    signal) is returned as OpenAI returns one: ``message.refusal``, content null, streamed as
    ``delta.refusal``; the SDK's ``parse`` then gives no object and the refusal. The API runs over
    the engine's scripted seam here, the one place a refusal can be had on demand whatever the
    adapters do."""
    from moa import MoAEngine
    from moa.api.app import create_api
    from moa.config import parse_config
    from moa.testing import Reply, ScriptedCaller

    models = {"first": {}}
    providers = {"a": {"kind": "openai_compatible", "base_url": "http://127.0.0.1:1/v1", "models": models}}
    cfg = parse_config({"providers": providers, "simulator": {"mode": "off"}})
    caller = ScriptedCaller()
    caller.script("a/first", Reply(text="", refusal=REFUSAL))

    async def health() -> dict[str, Any]:
        return {}

    app = create_api(cfg, MoAEngine(cfg, caller), health)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http)
        r = await client.chat.completions.parse(model="a/first", messages=ASK, response_format=Weather)  # type: ignore[arg-type]
        message = r.choices[0].message
        assert message.refusal == REFUSAL and message.content is None and message.parsed is None
        async with client.chat.completions.stream(
            model="a/first", messages=ASK, response_format=Weather
        ) as s:  # type: ignore[arg-type]
            refused = [ev.delta for ev in [e async for e in s] if ev.type == "refusal.delta"]
            final = await s.get_final_completion()
        assert "".join(refused) == REFUSAL == final.choices[0].message.refusal
        assert final.choices[0].message.parsed is None
    assert caller.calls_to("a/first")[0].request.response_format is not None


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/missing"},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
    ],
)
def test_a_schema_whose_references_cannot_be_resolved_is_a_400(
    api_url: str, sim: SimulatorServer, schema: dict[str, Any]
) -> None:
    """Nothing is fetched: a reference that does not point into the schema itself is refused when
    the request comes in (it would otherwise fail every validation), for a format as for a tool;
    a reference that does resolve is taken."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for extra, param in (
        ({"response_format": fmt(name="w", schema=schema)}, "response_format.json_schema.schema"),
        ({"tools": [tool]}, "tools.0.function.parameters"),
    ):
        r = httpx.post(api_url + "/v1/chat/completions", json={"model": "moa-lite", "messages": ASK, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and "cannot be resolved" in r.json()["error"]["message"]
    assert sim_total_requests(sim) == 0
    resolved = {
        "$defs": {"c": {"type": "string"}},
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/c"}},
    }
    ok = httpx.post(
        api_url + "/v1/chat/completions",
        json={"model": "single", "messages": ASK, "response_format": fmt(name="w", schema=resolved)},
        timeout=60,
    )
    assert (
        ok.status_code == 200 and json.loads(ok.json()["choices"][0]["message"]["content"])["city"] == "Paris"
    )
