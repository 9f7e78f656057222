"""Structured outputs through the OpenAI adapter (``moa/providers/openai_client.py``), streamed
and not, over HTTP through the official ``openai`` SDK.

Two doubles: a loopback server answering with OpenAI's recorded bodies (tests/fixtures/providers/
openai, the SDK's own ``parse`` snapshots), which records what the adapter sent, to hold the
request to the body the SDK itself sends for a strict schema; and the provider simulator, whose
models write documents (and refuse) as the API does and which refuses what the API refuses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from moa.providers.client import ProviderClient
from moa.simulator.server import SimulatorServer
from moa.simulator.structured import REFUSAL
from moa.types import CallRequest, ChatMessage, ErrorKind, ResponseFormat
from tests.helpers import json_errors, model_stats, set_fault, sim_requests, wait_idle
from tests.test_fidelity import FixtureServer, load, raw, serve, sse_events
from tests.test_providers import MODELS, both_ways, collect
from tests.test_tools_openai import chat_requests, client_at

MODEL = MODELS["openai"]
PARSE = load("openai/chat_completion_parse.request.json")
LOCATION = ResponseFormat(
    type="json_schema",
    name="Location",
    schema=PARSE["response_format"]["json_schema"]["schema"],
    strict=True,
)
ASK = "John Smith (john@example.com) wants the Enterprise plan: extract the contact as json."
CONTACT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "plan": {"type": "string", "enum": ["Free", "Pro", "Enterprise"]},
        "seats": {"type": "integer"},
    },
    "required": ["name", "email", "plan"],
}
AS_GIVEN = copy.deepcopy(CONTACT)
STRICT_CONTACT = ResponseFormat(type="json_schema", name="contact", schema=CONTACT, strict=True)


def request(fmt: ResponseFormat | None, text: str = ASK, provider: str = "openai") -> CallRequest:
    return CallRequest(
        provider=provider,
        model=MODELS[provider],
        messages=(ChatMessage(role="user", content=text),),
        response_format=fmt,
    )


@pytest.fixture
async def reference(served: FixtureServer) -> AsyncIterator[dict[str, ProviderClient]]:
    one = {"retry": {"max_attempts": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.01}}
    made = {p: client_at(p, served.url, **one) for p in ("openai", "local")}
    yield made
    for c in made.values():
        await c.aclose()


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[ProviderClient]:
    json_errors(sim, MODEL)
    made = client_at("openai", sim.url)
    yield made
    await made.aclose()


# -- the recorded bodies ---------------------------------------------------------------------------------


async def test_a_strict_schema_goes_as_the_sdks_parse_sends_it_and_the_document_is_the_text(
    served: FixtureServer, reference: dict[str, ProviderClient]
) -> None:
    """The SDK's ``parse(response_format=Location)`` body, field for field (``response_format``
    ``json_schema`` with name, schema and strict); the recorded answer's content is the text,
    with its usage; streamed, the content deltas are the text and the usage chunk is billed."""
    req = CallRequest(
        provider="openai",
        model=PARSE["model"],
        messages=tuple(ChatMessage(**m) for m in PARSE["messages"]),
        response_format=LOCATION,
    )
    serve(served, raw("openai/chat_completion_parse.response.json"))
    res = await reference["openai"].complete(req)
    (body,) = chat_requests(served)
    assert body == PARSE
    recorded = load("openai/chat_completion_parse.response.json")
    assert res.ok and res.refusal is None and res.finish_reason == "stop"
    assert res.text == recorded["choices"][0]["message"]["content"]
    assert json.loads(res.text) == {"city": "San Francisco", "temperature": 65, "units": "f"}
    assert (res.usage.input_tokens, res.usage.output_tokens) == (79, 14)

    serve(served, raw("openai/chat_completion_parse.stream.sse"))
    text, res = await collect(reference["openai"].stream(req))
    (body,) = chat_requests(served)
    assert body == PARSE | {"stream": True, "stream_options": {"include_usage": True}}
    assert res.ok and res.refusal is None and text == res.text
    jsonschema.validate(json.loads(text), LOCATION.json_schema or {})
    assert res.usage.output_tokens > 0 and not res.usage_estimated


async def test_a_recorded_refusal_comes_back_as_a_refusal_not_as_text(
    served: FixtureServer, reference: dict[str, ProviderClient]
) -> None:
    """``content: null`` with ``message.refusal``: the refusal is carried, the text is empty, and
    what the model generated is billed. Streamed, the ``delta.refusal`` pieces are never passed on
    as text; the whole refusal comes in the result."""
    req = request(LOCATION, "How do I pick a lock?")
    serve(served, raw("openai/chat_completion_parse_refusal.response.json"))
    res = await reference["openai"].complete(req)
    assert res.ok and res.text == "" and res.refusal == "I'm very sorry, but I can't assist with that."
    assert res.usage.output_tokens == 12 and res.cost_usd > 0

    recorded = raw("openai/chat_completion_parse_refusal.stream.sse")
    pieces = [
        d["choices"][0]["delta"].get("refusal")
        for _, d in sse_events(recorded)
        if d != "[DONE]" and d["choices"]
    ]
    serve(served, recorded)
    text, res = await collect(reference["openai"].stream(req))
    assert res.ok and text == res.text == ""
    assert res.refusal == "".join(p for p in pieces if p) == "I'm sorry, I can't assist with that request."
    assert res.usage.output_tokens > 0 and res.cost_usd > 0


async def test_a_compatible_server_gets_the_schema_as_it_is(
    served: FixtureServer, reference: dict[str, ProviderClient]
) -> None:
    """Structured Outputs' strict subset is OpenAI's: a compatible server (vLLM, llama.cpp)
    gets the schema untouched, keywords OpenAI would refuse included."""
    schema = {"type": "object", "properties": {"code": {"type": "string", "minLength": 3}}}
    fmt = ResponseFormat(type="json_schema", name="code", schema=schema, strict=True)
    serve(served, raw("openai/chat_completion_parse.response.json"))
    res = await reference["local"].complete(request(fmt, provider="local"))
    assert res.ok, res.error
    (body,) = chat_requests(served)
    expected = {"name": "code", "schema": schema, "strict": True}
    assert body["response_format"] == {"type": "json_schema", "json_schema": expected}


# -- the simulator ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [ResponseFormat(type="json_object"), ResponseFormat(type="json_schema", name="contact", schema=CONTACT)],
    ids=["json_object", "json_schema"],
)
async def test_the_document_is_the_answer_both_ways_and_the_schema_is_billed(
    sim: SimulatorServer, client: ProviderClient, fmt: ResponseFormat
) -> None:
    """The simulator receives the format OpenAI's way and writes the document; the answer's text
    is that document, plain and streamed; the schema counts as prompt tokens, as the API bills it."""
    for text, res in await both_ways(client, request(fmt)):
        assert res.ok and res.refusal is None and text == res.text
        doc = json.loads(text)
        assert isinstance(doc, dict)
        if fmt.json_schema is not None:
            jsonschema.validate(doc, fmt.json_schema)
            assert doc["email"] == "john@example.com" and doc["plan"] == "Enterprise"
    seen = [r["response_format"] for r in sim_requests(sim)[-2:]]
    assert seen == [{"type": fmt.type, "name": fmt.name, "strict": False}] * 2
    free = await client.complete(request(None))
    assert res.usage.input_tokens > free.usage.input_tokens or fmt.json_schema is None


async def test_a_simulated_refusal_is_carried_both_ways(sim: SimulatorServer, client: ProviderClient) -> None:
    json_errors(sim, MODEL, refusal=1.0)
    for text, res in await both_ways(client, request(STRICT_CONTACT)):
        assert res.ok and text == res.text == "" and res.refusal == REFUSAL
        assert res.usage.output_tokens > 0 and res.cost_usd > 0


async def test_a_strict_schema_is_closed_and_fully_required_before_it_goes(
    sim: SimulatorServer, client: ProviderClient
) -> None:
    """OpenAI refuses a strict schema with an open object or an optional property (the simulator
    as the API); both only narrow what is valid, so the adapter fits them, and the answer is
    valid against the schema as asked."""
    for text, res in await both_ways(client, request(STRICT_CONTACT)):
        assert res.ok, res.error
        doc = json.loads(text)
        jsonschema.validate(doc, CONTACT)
        assert set(doc) == set(CONTACT["properties"])  # "seats" was made required
    # Fitted on a copy: the schema the engine validates against is the one the request gave.
    assert STRICT_CONTACT.json_schema == AS_GIVEN
    assert [r["response_format"]["strict"] for r in sim_requests(sim)[-2:]] == [True, True]


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "string"}}, 'root must be of type "object"'),
        (
            {"type": "object", "properties": {"n": {"type": "string", "minLength": 2}}},
            "'minLength' at #/properties/n",
        ),
        (
            {"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}},
            "format 'uri' at #/properties/u",
        ),
        (None, "without its schema"),
    ],
    ids=["array-root", "minLength", "uri-format", "no-schema"],
)
async def test_a_strict_schema_openai_would_refuse_is_refused_before_sending(
    sim: SimulatorServer, client: ProviderClient, schema: dict[str, Any] | None, named: str
) -> None:
    """Refused as a bad request naming the place, nothing sent, nothing billed, plain and streamed."""
    fmt = ResponseFormat(type="json_schema", name="x", schema=schema, strict=True)
    for _, res in await both_ways(client, request(fmt)):
        assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
        assert named in res.error.message and res.error.status_code is None
        assert res.cost_usd == 0 and res.usage.total_tokens == 0
    assert model_stats(sim, MODEL)["requests"] == 0


async def test_json_mode_without_the_word_json_is_openais_own_400(client: ProviderClient) -> None:
    """OpenAI refuses JSON mode unless the messages mention JSON: passed on as its bad request
    (with its status: the provider answered), not billed."""
    res = await client.complete(request(ResponseFormat(type="json_object"), "Name three colours."))
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert res.error.status_code == 400 and "must contain the word 'json'" in res.error.message
    assert res.cost_usd == 0


async def test_a_stream_cut_mid_document_is_billed_for_the_schema_it_read(
    sim: SimulatorServer, client: ProviderClient
) -> None:
    """The connection drops while the document streams: the call is billed by estimate, and the
    estimate counts the schema as prompt, as the provider's invoice does (at least what the
    simulator bills)."""
    big = {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "a value the question may name " * 3}
            for i in range(12)
        },
    }
    fmt = ResponseFormat(type="json_schema", name="big", schema=big)
    set_fault(sim, MODEL, cut_stream={"rate": 1.0})
    before = model_stats(sim, MODEL)
    _, res = await collect(client.stream(request(fmt)))
    assert res.error is not None and res.usage_estimated and res.attempts == 1
    await wait_idle(sim)
    billed = model_stats(sim, MODEL)["billed_input_tokens"] - before.get("billed_input_tokens", 0)
    assert res.usage.input_tokens >= billed > 200


async def test_a_schema_without_a_name_goes_named_response_and_json_mode_as_documented(
    served: FixtureServer, reference: dict[str, ProviderClient]
) -> None:
    """OpenAI requires a json_schema format's name: ``response`` when the request gives none;
    ``strict`` goes only when the request says; JSON mode is ``{"type": "json_object"}``."""
    serve(served, raw("openai/chat_completion_parse.response.json"))
    await reference["openai"].complete(request(ResponseFormat(type="json_schema", schema=CONTACT)))
    (body,) = chat_requests(served)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": CONTACT},
    }
    serve(served, raw("openai/chat_completion_parse.response.json"))
    await reference["openai"].complete(request(ResponseFormat(type="json_object")))
    (body,) = chat_requests(served)
    assert body["response_format"] == {"type": "json_object"}
