"""Structured outputs through the Gemini adapter (``moa/providers/gemini_client.py``), streamed
and not, over HTTP through the official ``google-genai`` SDK.

A loopback server records what the adapter sent, to hold it to the structured output guide's
REST request (``generationConfig.responseMimeType: "application/json"`` with the schema; the
adapter sends it as ``responseJsonSchema``, full JSON Schema, where the guide's example uses the
OpenAPI-subset ``responseSchema``); the provider simulator writes the documents, blocks an answer
for safety when its profile says the model refuses, and bills the schema as prompt.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from moa.providers.client import ProviderClient
from moa.simulator.server import SimulatorServer
from moa.types import CallRequest, ChatMessage, ErrorKind, ResponseFormat, ToolSet
from tests.helpers import TOOL_WEATHER, json_errors, model_stats, sim_requests
from tests.test_fidelity import FixtureServer, client_for, load, raw, serve
from tests.test_providers import MODELS, both_ways, collect

MODEL = MODELS["gemini"]
GUIDE = load("gemini/structured_output.request.json")
GUIDE_ASK = ChatMessage(role="user", content=GUIDE["contents"][0]["parts"][0]["text"])


def json_schema(schema: Any) -> Any:
    """The guide's ``responseSchema`` (OpenAPI subset, upper-case types, ``propertyOrdering``)
    as the JSON Schema it stands for."""
    if isinstance(schema, dict):
        return {
            k: (v.lower() if k == "type" else json_schema(v))
            for k, v in schema.items()
            if k != "propertyOrdering"
        }
    return schema


RECIPES = ResponseFormat(
    type="json_schema", name="recipes", schema=json_schema(GUIDE["generationConfig"]["responseSchema"])
)


def request(fmt: ResponseFormat | None, *messages: ChatMessage) -> CallRequest:
    return CallRequest(provider="gemini", model=MODEL, messages=messages or (GUIDE_ASK,), response_format=fmt)


@pytest.fixture
async def reference(served: FixtureServer) -> AsyncIterator[ProviderClient]:
    client = client_for("gemini", served.url)
    yield client
    await client.aclose()


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[ProviderClient]:
    json_errors(sim, MODEL)
    made = client_for("gemini", sim.url)
    yield made
    await made.aclose()


async def test_a_schema_goes_as_the_guides_request_as_json_schema(
    served: FixtureServer, reference: ProviderClient
) -> None:
    """The guide's question gives the guide's contents and MIME type, the schema whole in
    ``responseJsonSchema`` (never both schema fields), plain and streamed; ``json_object`` is the
    MIME type alone."""
    serve(served, raw("gemini/generate_content.response.json"))
    assert (await reference.complete(request(RECIPES))).ok
    ((path, _, body),) = served.requests
    assert path.endswith(f"/models/{MODEL}:generateContent")
    assert body["contents"] == [GUIDE["contents"][0] | {"role": "user"}]
    config = body["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseJsonSchema": RECIPES.json_schema}

    serve(served, raw("gemini/stream.sse"))
    _, res = await collect(reference.stream(request(ResponseFormat(type="json_object"))))
    assert res.ok, res.error
    ((path, _, body),) = served.requests
    assert path.endswith(f"/models/{MODEL}:streamGenerateContent")
    assert body["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize(
    "fmt", [RECIPES, ResponseFormat(type="json_object")], ids=["json_schema", "json_object"]
)
async def test_the_document_is_the_answer_both_ways_and_the_schema_is_billed(
    sim: SimulatorServer, client: ProviderClient, fmt: ResponseFormat
) -> None:
    for text, res in await both_ways(client, request(fmt)):
        assert res.ok and res.refusal is None and res.finish_reason == "stop" and text == res.text
        doc = json.loads(text)
        if fmt.json_schema is not None:
            jsonschema.validate(doc, fmt.json_schema)
            assert len(doc) == 3 and all(r["recipeName"] and r["ingredients"] for r in doc)
        else:
            assert isinstance(doc, dict) and doc
    assert [r["response_format"]["type"] for r in sim_requests(sim)[-2:]] == [fmt.type] * 2
    free = await client.complete(request(None))
    assert res.usage.input_tokens > free.usage.input_tokens or fmt.json_schema is None


async def test_an_answer_blocked_for_safety_is_a_refusal_both_ways(
    sim: SimulatorServer, client: ProviderClient
) -> None:
    """Gemini refuses by blocking the answer (finish reason SAFETY, no content): a refusal in the
    API's words (the reason and the category that blocked it), no text, finish ``content_filter``."""
    json_errors(sim, MODEL, refusal=1.0)
    for text, res in await both_ways(client, request(RECIPES)):
        assert res.ok and text == res.text == "" and res.finish_reason == "content_filter"
        assert res.refusal is not None
        assert "SAFETY" in res.refusal and "HARM_CATEGORY_DANGEROUS_CONTENT" in res.refusal
        assert res.usage.input_tokens > 0 and res.cost_usd > 0


async def test_a_written_answer_is_no_refusal(client: ProviderClient) -> None:
    res = await client.complete(request(None))
    assert res.ok and res.text and res.refusal is None


async def test_a_schema_format_without_a_schema_is_refused_before_sending(
    sim: SimulatorServer, client: ProviderClient
) -> None:
    for _, res in await both_ways(client, request(ResponseFormat(type="json_schema"))):
        assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
        assert "without its schema" in res.error.message and res.cost_usd == 0
    assert model_stats(sim, MODEL)["requests"] == 0


async def test_function_calling_with_json_before_gemini_3_is_the_apis_own_400(client: ProviderClient) -> None:
    req = request(RECIPES).model_copy(update={"tools": ToolSet(tools=(TOOL_WEATHER,))})
    res = await client.complete(req)
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert res.error.status_code == 400 and "unsupported" in res.error.message and res.cost_usd == 0


# A prompt the API blocks: no candidate, promptFeedback.blockReason (the API reference's
# GenerateContentResponse; this body is ours, in its fields).
BLOCKED_PROMPT = {
    "promptFeedback": {
        "blockReason": "SAFETY",
        "safetyRatings": [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
        ],
    },
    "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    "modelVersion": MODEL,
}


async def test_a_prompt_the_api_blocks_is_a_refusal_both_ways(
    served: FixtureServer, reference: ProviderClient
) -> None:
    """No candidate, ``promptFeedback.blockReason``: a refusal in the API's words, finish
    ``content_filter``, its prompt billed, not retried (the provider did not fail)."""
    serve(served, json.dumps(BLOCKED_PROMPT).encode())
    res = await reference.complete(request(RECIPES))
    serve(served, b"data: " + json.dumps(BLOCKED_PROMPT).encode() + b"\r\n\r\n")
    text, streamed = await collect(reference.stream(request(RECIPES)))
    for r in (res, streamed):
        assert r.ok and r.text == "" and r.finish_reason == "content_filter" and r.attempts == 1
        assert r.refusal == "the prompt was blocked (promptFeedback.blockReason SAFETY)"
        assert r.usage.input_tokens == 8
    assert text == ""
