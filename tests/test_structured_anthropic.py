"""Structured outputs through the Anthropic adapter (``moa/providers/anthropic_client.py``),
streamed and not, over HTTP through the official ``anthropic`` SDK.

A loopback server records what the adapter sent, to hold it to the structured outputs guide's
request (``output_config.format``); the provider simulator, which refuses what the API refuses
(an open object, the constraints Claude's decoding does not take), writes the guide's document
for the guide's question, refuses when its profile says so, and bills the schema as prompt.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from moa.providers.anthropic_client import JSON_TOOL_SPEC
from moa.providers.client import ProviderClient
from moa.simulator.server import SimulatorServer
from moa.simulator.structured import REFUSAL
from moa.types import CallRequest, ChatMessage, ErrorKind, ResponseFormat, ToolSet
from tests.helpers import TOOL_WEATHER, json_errors, model_stats, sim_requests
from tests.test_fidelity import FixtureServer, client_for, load, raw, serve
from tests.test_providers import MODELS, both_ways, collect

MODEL = MODELS["anthropic"]
GUIDE = load("anthropic/structured_output.request.json")
GUIDE_FORMAT = ResponseFormat(type="json_schema", schema=GUIDE["output_config"]["format"]["schema"])
GUIDE_ASK = ChatMessage(**GUIDE["messages"][0])
# A schema as a client writes it: open objects, and constraints Claude's decoding does not take.
ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 80},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["item", "quantity"],
}
AS_GIVEN = copy.deepcopy(ORDER)
ORDER_ASK = ChatMessage(role="user", content='Order 12 of "blue widgets", please.')


def request(fmt: ResponseFormat | None, *messages: ChatMessage, model: str = MODEL, **kw: Any) -> CallRequest:
    return CallRequest(
        provider="anthropic", model=model, messages=messages or (GUIDE_ASK,), response_format=fmt, **kw
    )


@pytest.fixture
async def reference(served: FixtureServer) -> AsyncIterator[ProviderClient]:
    client = client_for("anthropic", served.url)
    yield client
    await client.aclose()


def sent_body(served: FixtureServer) -> Any:
    ((path, _, body),) = served.requests
    assert path == "/v1/messages"
    return body


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[ProviderClient]:
    json_errors(sim, MODEL)
    made = client_for("anthropic", sim.url)
    yield made
    await made.aclose()


async def test_a_schema_goes_as_the_guides_output_config_request(
    served: FixtureServer, reference: ProviderClient
) -> None:
    """The guide's question and schema give the guide's body field for field, plain and
    streamed: ``output_config.format`` ``{"type": "json_schema", "schema": ...}``, no tool."""
    req = request(GUIDE_FORMAT, model=GUIDE["model"])
    serve(served, raw("anthropic/message.response.json"))
    assert (await reference.complete(req)).ok
    assert sent_body(served) == GUIDE
    serve(served, raw("anthropic/stream.sse").rstrip(b"\n") + b"\n\n")
    _, res = await collect(reference.stream(req))
    assert res.ok, res.error
    assert sent_body(served) == GUIDE | {"stream": True}


async def test_the_guides_document_is_the_answer_both_ways_and_the_schema_is_billed(
    client: ProviderClient,
) -> None:
    """The simulated Claude writes the guide's document for the guide's question: the answer's
    text, plain and streamed; the schema is billed as prompt tokens."""
    for text, res in await both_ways(client, request(GUIDE_FORMAT)):
        assert res.ok and res.refusal is None and res.finish_reason == "stop" and text == res.text
        assert json.loads(text) == load("anthropic/structured_output.document.json")
        assert res.tool_calls == []
    free = await client.complete(request(None))
    assert res.usage.input_tokens > free.usage.input_tokens and res.cost_usd > 0


async def test_a_client_schema_is_fitted_as_the_sdk_fits_it_and_the_answer_holds_to_it_as_asked(
    served: FixtureServer, reference: ProviderClient, client: ProviderClient
) -> None:
    """Open objects and length, range and item bounds are refused by Claude's structured outputs
    (the simulator as the API): they go closed, the bounds in the description (as the SDK's
    ``transform_schema`` writes them), and the answer is valid against the schema as asked."""
    fmt = ResponseFormat(type="json_schema", schema=ORDER)
    serve(served, raw("anthropic/message.response.json"))
    assert (await reference.complete(request(fmt))).ok
    schema = sent_body(served)["output_config"]["format"]["schema"]
    assert schema["additionalProperties"] is False
    assert "minimum" not in schema["properties"]["quantity"]
    assert "minimum: 1" in schema["properties"]["quantity"]["description"]
    for text, res in await both_ways(client, request(fmt, ORDER_ASK)):
        assert res.ok, res.error
        doc = json.loads(text)
        jsonschema.validate(doc, ORDER)
        assert doc["item"] == "blue widgets" and doc["quantity"] == 12
    # Fitted on a copy: the schema the engine validates against is the one the request gave.
    assert fmt.json_schema == AS_GIVEN


async def test_json_object_is_a_forced_tool_whose_input_is_the_answer(
    served: FixtureServer, reference: ProviderClient, sim: SimulatorServer, client: ProviderClient
) -> None:
    """The API has no JSON mode: one tool taking any object, forced; its input comes back as the
    answer's text (no tool call, finish ``stop``), plain and streamed."""
    fmt = ResponseFormat(type="json_object")
    serve(served, raw("anthropic/tool_use.response.json"))
    await reference.complete(request(fmt))
    body = sent_body(served)
    assert body["tools"] == [JSON_TOOL_SPEC]
    assert body["tool_choice"] == {"type": "tool", "name": JSON_TOOL_SPEC["name"]}
    assert "output_config" not in body
    for text, res in await both_ways(client, request(fmt)):
        assert res.ok and res.finish_reason == "stop" and res.tool_calls == [] and text == res.text
        assert isinstance(json.loads(text), dict)
        assert res.usage.output_tokens > 0
    forced = {"names": ["json_answer"], "choice": "required", "allowed": ["json_answer"], "parallel": True}
    assert [r["tools"] for r in sim_requests(sim)[-2:]] == [forced, forced]


async def test_a_refusal_is_carried_both_ways(sim: SimulatorServer, client: ProviderClient) -> None:
    """``stop_reason: "refusal"``: the refusal is carried (its words), the finish is
    ``content_filter``, and what the model wrote is billed."""
    json_errors(sim, MODEL, refusal=1.0)
    for _, res in await both_ways(client, request(GUIDE_FORMAT)):
        assert res.ok and res.refusal == REFUSAL and res.finish_reason == "content_filter"
        assert res.usage.output_tokens > 0 and res.cost_usd > 0


@pytest.mark.parametrize(
    ("fmt", "tools", "named"),
    [
        (ResponseFormat(type="json_object"), ToolSet(tools=(TOOL_WEATHER,)), "no JSON mode"),
        (ResponseFormat(type="json_schema", schema={"description": "anything"}), None, "cannot take"),
        (ResponseFormat(type="json_schema"), None, "without its schema"),
    ],
    ids=["json_object-with-tools", "untyped-schema", "no-schema"],
)
async def test_a_format_the_api_cannot_take_is_refused_before_sending(
    sim: SimulatorServer, client: ProviderClient, fmt: ResponseFormat, tools: ToolSet | None, named: str
) -> None:
    for _, res in await both_ways(client, request(fmt, tools=tools)):
        assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
        assert named in res.error.message and res.error.status_code is None
        assert res.cost_usd == 0 and res.usage.total_tokens == 0
    assert model_stats(sim, MODEL)["requests"] == 0
