"""The simulator's structured outputs and images, on all three wires, as the official SDKs and the
published bodies see them.

Three directions, as for tool calling (tests/test_simulator_tools.py):

- fidelity: the providers' published and recorded examples (tests/fixtures/providers, provenance
  in its README) go through the simulator, and its bodies and stream events must have their
  shape, field by field and event by event;
- behaviour: the real ``openai``, ``anthropic`` and ``google-genai`` clients ask for JSON (their
  ``parse`` helpers included) and send images, streaming and not; the document follows the
  schema, takes its values from the question, and repeats by seed; an image is measured, billed by
  its provider's rule and acknowledged in the answer;
- refusals and faults: malformed requests are refused in each provider's own words and shape, a
  model without vision refuses an image, and each structured-output error a model's profile can
  inject, at rate 1.0, produces exactly the fault it names, except where a schema holds decoding.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from PIL import Image as PILImage
from pydantic import BaseModel

from moa.simulator.images import (
    ASSUMED_SIZE,
    anthropic_tokens,
    gemini_tokens,
    openai_tokens,
    sniff,
    vision_capable,
)
from moa.simulator.profile import JsonErrors, ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer
from tests.conftest import SIM_KEY as KEY
from tests.helpers import sim_requests, sim_stats
from tests.test_fidelity import assert_shape, collapse, load, raw, sse_events

OPENAI_AUTH = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC_AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GEMINI_AUTH = {"x-goog-api-key": KEY}
FAST = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)


class Location(BaseModel):
    """The model of the openai SDK's recorded parse tests (tests/lib/chat/test_completions.py)."""

    city: str
    temperature: float
    units: Literal["c", "f"]


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):
    """OpenAI's Structured Outputs guide's example: a nested list of objects."""

    steps: list[Step]
    final_answer: str


CONTACT = load("anthropic/structured_output.request.json")["output_config"]["format"]["schema"]
GRADE = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["pass", "fail"]},
        "score": {"type": "integer"},
        "reason": {"type": "string"},
    },
    "required": ["verdict", "score", "reason"],
    "additionalProperties": False,
}
ASK_GRADE = "Grade this answer as JSON: is 2 + 2 = 4 a pass?"


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def data_url(width: int, height: int, fmt: str = "PNG") -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(image_bytes(width, height, fmt)).decode()


def profile(**models: ModelProfile) -> dict[str, Any]:
    return SimProfile(default=FAST, models=models).model_dump(mode="json")


def erring(http: httpx.Client, **rates: float) -> str:
    """A model whose profile errs in structured answers at these rates; its name."""
    model = "gpt-4.1-" + "-".join(sorted(rates))
    entry = FAST.model_copy(update={"json_errors": JsonErrors(**rates)})
    http.put("/admin/profile", json=profile(**{model: entry})).raise_for_status()
    return model


@pytest.fixture
def http(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        client.put("/admin/profile", json=profile()).raise_for_status()
        yield client


def json_schema_of(gemini_schema: Any) -> Any:
    """A Gemini Schema (upper-case types, propertyOrdering) as the JSON Schema it stands for."""
    if isinstance(gemini_schema, dict):
        return {
            k: (v.lower() if k == "type" else json_schema_of(v))
            for k, v in gemini_schema.items()
            if k != "propertyOrdering"
        }
    return gemini_schema


def openai_post(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, headers=OPENAI_AUTH)


def grade_body(model: str = "gpt-4.1", strict: bool = False, **extra: Any) -> dict[str, Any]:
    rf = {"type": "json_schema", "json_schema": {"name": "grade", "schema": GRADE, "strict": strict}}
    return {
        "model": model,
        "messages": [{"role": "user", "content": ASK_GRADE}],
        "response_format": rf,
    } | extra


# -- fidelity: OpenAI's recorded and published examples --------------------------------------------------

# Newer than the openai SDK's 2024 recordings: the message's annotations, the usage's prompt and
# audio details, service_tier (the plain completion's shape test holds those against the
# reference that shows them).
OPENAI_NEWER = frozenset(
    {
        "$.choices[].message.annotations",
        "$.usage.prompt_tokens_details",
        "$.usage.completion_tokens_details.audio_tokens",
        "$.usage.completion_tokens_details.accepted_prediction_tokens",
        "$.usage.completion_tokens_details.rejected_prediction_tokens",
        "$.service_tier",
    }
)


def test_openai_structured_answer_has_the_recorded_shape(http: httpx.Client) -> None:
    request = load("openai/chat_completion_parse.request.json")
    r = openai_post(http, request)
    assert r.status_code == 200
    body = r.json()
    assert_shape(load("openai/chat_completion_parse.response.json"), body, OPENAI_NEWER)
    message = body["choices"][0]["message"]
    assert message["refusal"] is None and body["choices"][0]["finish_reason"] == "stop"
    document = json.loads(message["content"])
    jsonschema.validate(document, request["response_format"]["json_schema"]["schema"])
    assert document["city"] == "SF"  # the question's proper noun
    assert sim_requests(http)[-1]["response_format"] == {
        "type": "json_schema",
        "name": "Location",
        "strict": True,
    }


def openai_chunk_kind(data: Any) -> str:
    if data == "[DONE]":
        return "done"
    if not data["choices"]:
        return "usage"
    choice = data["choices"][0]
    if choice["finish_reason"]:
        return "finish"
    delta = choice["delta"]
    if "role" in delta:
        return "role"
    return "refusal" if "refusal" in delta else "content"


# Newer than the 2024 recordings: usage null on every chunk, service_tier, obfuscation (the plain
# stream's shape test holds them), and the usage's newer details.
STREAM_NEWER = frozenset(
    {
        "$.usage",
        "$.service_tier",
        "$.obfuscation",
        "$.usage.prompt_tokens_details",
        "$.usage.completion_tokens_details.audio_tokens",
        "$.usage.completion_tokens_details.accepted_prediction_tokens",
        "$.usage.completion_tokens_details.rejected_prediction_tokens",
    }
)


def assert_stream_like(got: list[Any], fixture: str) -> None:
    ref = [d for _, d in sse_events(raw(fixture))]
    assert collapse([openai_chunk_kind(d) for d in got]) == collapse([openai_chunk_kind(d) for d in ref])
    by_kind = {openai_chunk_kind(d): d for d in ref}
    for data in got[:-1]:
        assert_shape(by_kind[openai_chunk_kind(data)], data, STREAM_NEWER)


def test_openai_structured_stream_has_the_recorded_events(http: httpx.Client) -> None:
    body = load("openai/chat_completion_parse.request.json") | {
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = openai_post(http, body)
    assert r.status_code == 200
    got = [d for _, d in sse_events(r.content)]
    assert_stream_like(got, "openai/chat_completion_parse.stream.sse")
    pieces = [d["choices"][0]["delta"]["content"] for d in got if openai_chunk_kind(d) == "content"]
    assert len(pieces) > 3  # the document streams a few characters at a time
    plain = openai_post(http, load("openai/chat_completion_parse.request.json")).json()
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]


def test_openai_refusal_has_the_recorded_shape_plain_and_streamed(http: httpx.Client) -> None:
    model = erring(http, refusal=1.0)
    request = load("openai/chat_completion_parse.request.json") | {"model": model}
    body = openai_post(http, request).json()
    assert_shape(load("openai/chat_completion_parse_refusal.response.json"), body, OPENAI_NEWER)
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] and body["choices"][0]["finish_reason"] == "stop"
    streamed = openai_post(http, request | {"stream": True, "stream_options": {"include_usage": True}})
    got = [d for _, d in sse_events(streamed.content)]
    assert_stream_like(got, "openai/chat_completion_parse_refusal.stream.sse")
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": None, "refusal": ""}
    said = "".join(d["choices"][0]["delta"]["refusal"] for d in got if openai_chunk_kind(d) == "refusal")
    assert said == message["refusal"]
    assert sim_stats(http)[model]["faults"] == {"json_refusal": 2}


def test_openai_image_input_has_the_reference_shape(http: httpx.Client) -> None:
    request = load("openai/chat_completion_image.request.json")
    r = openai_post(http, request)
    assert r.status_code == 200
    body = r.json()
    # The reference's model reports no system_fingerprint; the simulator sends one (the plain
    # completion's reference shows it).
    assert_shape(
        load("openai/chat_completion_image.response.json"), body, frozenset({"$.system_fingerprint"})
    )
    text = body["choices"][0]["message"]["content"]
    assert text.startswith(
        "Looking at the image you sent (an image by URL, not fetched (counted as 1024x1024))"
    )
    without = openai_post(
        http, request | {"messages": [{"role": "user", "content": "What is in this image?"}]}
    )
    # A URL image is never fetched: billed as the assumed 1024x1024 at detail auto (as high).
    billed = body["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert billed == openai_tokens(ASSUMED_SIZE, ASSUMED_SIZE, "high") == 765
    (seen,) = sim_requests(http)[-2]["images"]
    assert seen == {
        "source": "url",
        "media_type": None,
        "width": 1024,
        "height": 1024,
        "measured": False,
        "tokens": 765,
    }


# -- fidelity: Anthropic's published examples -------------------------------------------------------------

# The create example's usage shows only input and output tokens; the caching guide's the rest (the
# plain message's shape test holds those).
ANTHROPIC_USAGE = frozenset(
    f"$.usage.{k}"
    for k in ("cache_creation", "cache_creation_input_tokens", "cache_read_input_tokens", "service_tier")
)


def test_anthropic_structured_output_is_the_guides_document(http: httpx.Client) -> None:
    """The structured outputs guide's example, answered with the guide's own document: every value
    comes from the email (the name and plan its proper nouns, the address, the demo it mentions)."""
    r = http.post(
        "/v1/messages", json=load("anthropic/structured_output.request.json"), headers=ANTHROPIC_AUTH
    )
    assert r.status_code == 200
    body = r.json()
    assert_shape(load("anthropic/message.response.json"), body, ANTHROPIC_USAGE)
    assert body["stop_reason"] == "end_turn" and [b["type"] for b in body["content"]] == ["text"]
    assert json.loads(body["content"][0]["text"]) == load("anthropic/structured_output.document.json")
    streamed = http.post(
        "/v1/messages",
        json=load("anthropic/structured_output.request.json") | {"stream": True},
        headers=ANTHROPIC_AUTH,
    )
    deltas = [d["delta"]["text"] for n, d in sse_events(streamed.content) if n == "content_block_delta"]
    assert len(deltas) > 3 and "".join(deltas) == body["content"][0]["text"]


def test_anthropic_images_from_the_vision_guide(http: httpx.Client) -> None:
    by_data = http.post(
        "/v1/messages", json=load("anthropic/image_base64.request.json"), headers=ANTHROPIC_AUTH
    )
    assert by_data.status_code == 200
    assert_shape(load("anthropic/message.response.json"), by_data.json(), ANTHROPIC_USAGE)
    text = by_data.json()["content"][0]["text"]
    assert text.startswith("Looking at the image you sent (a 64x48 JPEG): ")
    by_url = http.post("/v1/messages", json=load("anthropic/image_url.request.json"), headers=ANTHROPIC_AUTH)
    assert by_url.status_code == 200
    assert "an image by URL, not fetched" in by_url.json()["content"][0]["text"]
    # Width x height / 750: 5 tokens for 64x48, 1,399 for the assumed 1024x1024.
    assert by_url.json()["usage"]["input_tokens"] - by_data.json()["usage"]["input_tokens"] == (
        anthropic_tokens(1024, 1024) - anthropic_tokens(64, 48)
    )
    assert anthropic_tokens(64, 48) == 5


# -- fidelity: Gemini's published examples ---------------------------------------------------------------

GEMINI_NEWER = frozenset(
    {
        "$.usageMetadata.promptTokensDetails",
        "$.modelVersion",
        "$.responseId",
        "$.candidates[].safetyRatings",
    }
)


def gemini_post(
    http: httpx.Client, body: Any, action: str = "generateContent", model: str = "gemini-2.5-flash"
) -> httpx.Response:
    return http.post(f"/v1beta/models/{model}:{action}", json=body, headers=GEMINI_AUTH)


def test_gemini_image_input_has_the_cookbook_shape(http: httpx.Client) -> None:
    r = gemini_post(http, load("gemini/image.request.json"))
    assert r.status_code == 200
    body = r.json()
    # The cookbook's 2024 response predates the usage's modality details, modelVersion and
    # responseId (the captured stream shows them) and rates safety, which the simulator does not.
    assert_shape(load("gemini/image.response.json"), body, GEMINI_NEWER)
    assert body["candidates"][0]["content"]["parts"][0]["text"].startswith(
        "Looking at the image you sent (a 64x48 JPEG): "
    )
    details = body["usageMetadata"]["promptTokensDetails"]
    assert details[1] == {"modality": "IMAGE", "tokenCount": 258}
    assert (
        details[0]["modality"] == "TEXT"
        and details[0]["tokenCount"] + 258 == body["usageMetadata"]["promptTokenCount"]
    )


def test_gemini_structured_output_from_the_docs(http: httpx.Client) -> None:
    request = load("gemini/structured_output.request.json")
    r = gemini_post(http, request)
    assert r.status_code == 200
    body = r.json()
    assert_shape(load("gemini/generate_content.response.json"), body, GEMINI_NEWER)
    text = body["candidates"][0]["content"]["parts"][0]["text"]
    document = json.loads(text)
    jsonschema.validate(document, json_schema_of(request["generationConfig"]["responseSchema"]))
    assert len(document) == 3 and all(list(item) == ["recipeName", "ingredients"] for item in document)
    chunks = [d for _, d in sse_events(gemini_post(http, request, "streamGenerateContent?alt=sse").content)]
    streamed = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert len(chunks) > 3 and streamed == text


# -- behaviour: the SDKs' parse helpers, streamed and not ------------------------------------------------


def test_openai_sdk_parse_returns_the_parsed_object(oai: openai.OpenAI) -> None:
    messages: Any = [
        {
            "role": "system",
            "content": "You are a helpful math tutor. Guide the user through the solution step by step.",
        },
        {"role": "user", "content": "how can I solve 8x + 7 = -23"},
    ]
    c = oai.chat.completions.parse(model="gpt-4.1", messages=messages, response_format=MathReasoning)
    parsed = c.choices[0].message.parsed
    assert isinstance(parsed, MathReasoning) and len(parsed.steps) == 3 and parsed.final_answer
    with oai.chat.completions.stream(model="gpt-4.1", messages=messages, response_format=MathReasoning) as s:
        streamed = s.get_final_completion()
    assert streamed.choices[0].message.parsed == parsed
    # The refusal is the SDK's too: parsed is None, refusal carries the words.
    located = oai.chat.completions.parse(
        model="gpt-4.1", messages=[{"role": "user", "content": "Weather in SF?"}], response_format=Location
    )
    assert isinstance(located.choices[0].message.parsed, Location)


def test_anthropic_sdk_parse_returns_the_parsed_object(claude: anthropic.Anthropic) -> None:
    ask: Any = [{"role": "user", "content": "What's the weather like in SF, in celsius?"}]
    m = claude.messages.parse(model="claude-sonnet-4-6", max_tokens=512, messages=ask, output_format=Location)
    assert isinstance(m.parsed_output, Location) and m.parsed_output.units == "c"  # the unit it mentions
    with claude.messages.stream(
        model="claude-sonnet-4-6", max_tokens=512, messages=ask, output_format=Location
    ) as s:
        final = s.get_final_message()
    assert final.parsed_output == m.parsed_output


def test_gemini_sdk_parsed_with_either_schema_field(gem: genai.Client) -> None:
    ask = "What's the weather like in SF?"
    by_schema = gem.models.generate_content(
        model="gemini-2.5-flash",
        contents=ask,
        config=genai_types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=Location
        ),
    )
    assert isinstance(by_schema.parsed, Location)
    by_json_schema = gem.models.generate_content(
        model="gemini-2.5-flash",
        contents=ask,
        config=genai_types.GenerateContentConfig(
            response_mime_type="application/json", response_json_schema=Location.model_json_schema()
        ),
    )
    Location.model_validate_json(by_json_schema.text or "")
    chunks = list(
        gem.models.generate_content_stream(
            model="gemini-2.5-flash",
            contents=ask,
            config=genai_types.GenerateContentConfig(
                response_mime_type="application/json", response_schema=Location
            ),
        )
    )
    assert "".join(c.text or "" for c in chunks) == by_schema.text


def test_documents_are_deterministic_by_model_conversation_schema_and_seed(http: httpx.Client) -> None:
    def doc(seed: int, **change: Any) -> str:
        body = grade_body(seed=seed, temperature=1.0) | change
        return str(openai_post(http, body).json()["choices"][0]["message"]["content"])

    first = [doc(seed) for seed in range(8)]
    assert [doc(seed) for seed in range(8)] == first
    assert all(json.loads(d)["verdict"] == "pass" for d in first)  # the enum value the question names
    assert len({json.loads(d)["score"] for d in first}) == 1  # the number it gives (2, of "2 + 2")
    # What the question does not fix (a score it gives no number for, the prose) the seed draws.
    unnumbered = [{"role": "user", "content": "Grade this answer as JSON: is the sky blue a pass?"}]
    scores = {json.loads(doc(seed, messages=unnumbered))["score"] for seed in range(8)}
    assert len(scores) > 1 and all(1 <= s <= 10 for s in scores)
    assert doc(0, model="gpt-4.1-mini") != first[0]
    schema = {**GRADE, "properties": {**GRADE["properties"], "verdict": {"type": "string"}}}
    changed = grade_body(seed=0, temperature=1.0)
    changed["response_format"]["json_schema"]["schema"] = schema
    assert json.loads(openai_post(http, changed).json()["choices"][0]["message"]["content"]) != json.loads(
        first[0]
    )


def test_json_mode_needs_the_word_and_answers_an_object(http: httpx.Client) -> None:
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Name three gases."}]}
    refused = openai_post(http, body | {"response_format": {"type": "json_object"}})
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        "'json_object'.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }
    system = {"role": "system", "content": "Answer in JSON."}
    ok = openai_post(
        http, body | {"messages": [system, *body["messages"]], "response_format": {"type": "json_object"}}
    )
    document = json.loads(ok.json()["choices"][0]["message"]["content"])
    assert set(document) == {"answer", "topic", "keywords"} and "gases" in " ".join(document["keywords"])


# -- the error modes -------------------------------------------------------------------------------------


def test_malformed_json_does_not_parse_and_is_counted(http: httpx.Client) -> None:
    model = erring(http, malformed_json=1.0)
    content = openai_post(http, grade_body(model)).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(content)
    assert sim_stats(http)[model]["faults"] == {"json_malformed_json": 1}


def test_schema_violations_break_the_schema_in_each_way(http: httpx.Client) -> None:
    model = erring(http, schema_violation=1.0)
    seen = set()
    for seed in range(24):
        document = json.loads(
            openai_post(http, grade_body(model, seed=seed)).json()["choices"][0]["message"]["content"]
        )
        with pytest.raises(jsonschema.ValidationError) as caught:
            jsonschema.validate(document, GRADE)
        seen.add(caught.value.validator)
    assert seen == {"required", "type", "enum"}  # a required field missing, a wrong type, outside the enum
    assert sim_stats(http)[model]["faults"] == {"json_schema_violation": 24}


def test_a_schema_that_holds_decoding_is_never_broken(
    http: httpx.Client, claude: anthropic.Anthropic, gem: genai.Client
) -> None:
    """Strict decoding: OpenAI's strict json_schema, Gemini's schemas and Claude's output_config
    never write malformed or off-schema JSON, whatever the model's rates; a refusal still happens."""
    model = erring(http, malformed_json=1.0, schema_violation=1.0)
    for seed in range(6):
        document = json.loads(
            openai_post(http, grade_body(model, strict=True, seed=seed)).json()["choices"][0]["message"][
                "content"
            ]
        )
        jsonschema.validate(document, GRADE)
    claude_model = model.replace("gpt-4.1", "claude-sonnet-4-6")
    gemini_model = model.replace("gpt-4.1", "gemini-2.5-flash")
    entry = FAST.model_copy(update={"json_errors": JsonErrors(malformed_json=1.0, schema_violation=1.0)})
    http.put("/admin/profile", json=profile(**{claude_model: entry, gemini_model: entry})).raise_for_status()
    m = claude.messages.create(
        model=claude_model,
        max_tokens=512,
        messages=[{"role": "user", "content": ASK_GRADE}],
        output_config={"format": {"type": "json_schema", "schema": GRADE}},
    )
    jsonschema.validate(json.loads(m.content[0].text), GRADE)  # type: ignore[union-attr]
    g = gem.models.generate_content(
        model=gemini_model,
        contents=ASK_GRADE,
        config=genai_types.GenerateContentConfig(
            response_mime_type="application/json", response_json_schema=GRADE
        ),
    )
    jsonschema.validate(json.loads(g.text or ""), GRADE)
    assert not sim_stats(http)[claude_model]["faults"] and not sim_stats(http)[gemini_model]["faults"]
    refusing = erring(http, refusal=1.0)
    refused = openai_post(http, grade_body(refusing, strict=True)).json()["choices"][0]["message"]
    assert refused["content"] is None and refused["refusal"]


def test_refusal_on_every_wire(http: httpx.Client, claude: anthropic.Anthropic, gem: genai.Client) -> None:
    model = "refuses-always"
    entry = FAST.model_copy(update={"json_errors": JsonErrors(refusal=1.0)})
    names = {"claude": "claude-sonnet-4-6-refuses", "gemini": "gemini-2.5-flash-refuses"}
    http.put(
        "/admin/profile", json=profile(**{model: entry, **{n: entry for n in names.values()}})
    ).raise_for_status()
    m = claude.messages.create(
        model=names["claude"],
        max_tokens=512,
        messages=[{"role": "user", "content": ASK_GRADE}],
        output_config={"format": {"type": "json_schema", "schema": GRADE}},
    )
    assert m.stop_reason == "refusal" and m.content[0].type == "text" and m.content[0].text
    with claude.messages.stream(
        model=names["claude"],
        max_tokens=512,
        messages=[{"role": "user", "content": ASK_GRADE}],
        output_config={"format": {"type": "json_schema", "schema": GRADE}},
    ) as s:
        assert s.get_final_message().stop_reason == "refusal"
    config = genai_types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=GRADE
    )
    g = gem.models.generate_content(model=names["gemini"], contents=ASK_GRADE, config=config)
    assert g.candidates and g.candidates[0].finish_reason == genai_types.FinishReason.SAFETY
    assert g.text is None
    (chunk,) = list(
        gem.models.generate_content_stream(model=names["gemini"], contents=ASK_GRADE, config=config)
    )
    assert chunk.candidates and chunk.candidates[0].finish_reason == genai_types.FinishReason.SAFETY


# -- refusals in each provider's words -------------------------------------------------------------------

STRICT = {"type": "json_schema", "json_schema": {"name": "grade", "strict": True}}
OPENAI_BAD_FORMATS = [
    (
        {"type": "xml"},
        "Invalid value: 'xml'. Supported values are: 'text', 'json_object', and 'json_schema'.",
        "invalid_value",
    ),
    (
        {"type": "json_schema"},
        "Missing required parameter: 'response_format.json_schema'.",
        "missing_required_parameter",
    ),
    (
        {"type": "json_schema", "json_schema": {"schema": GRADE}},
        "Missing required parameter: 'response_format.json_schema.name'.",
        "missing_required_parameter",
    ),
    (
        STRICT
        | {
            "json_schema": {**STRICT["json_schema"], "schema": {"type": "array", "items": {"type": "string"}}}
        },
        "Invalid schema for response_format 'grade': schema must be a JSON Schema of 'type: \"object\"', "
        "got 'type: \"array\"'.",
        "invalid_json_schema",
    ),
    (
        STRICT
        | {"json_schema": {**STRICT["json_schema"], "schema": {**GRADE, "additionalProperties": True}}},
        "Invalid schema for response_format 'grade': In context=(), 'additionalProperties' is required to "
        "be supplied and to be false.",
        "invalid_json_schema",
    ),
    (
        STRICT | {"json_schema": {**STRICT["json_schema"], "schema": {**GRADE, "required": ["verdict"]}}},
        "Invalid schema for response_format 'grade': In context=(), 'required' is required to be supplied "
        "and to be an array including every key in properties. Missing 'score'.",
        "invalid_json_schema",
    ),
    (
        STRICT
        | {
            "json_schema": {
                **STRICT["json_schema"],
                "schema": {
                    **GRADE,
                    "properties": {**GRADE["properties"], "reason": {"type": "string", "default": "none"}},
                },
            }
        },
        "Invalid schema for response_format 'grade': In context=('properties', 'reason'), 'default' is not "
        "permitted.",
        "invalid_json_schema",
    ),
    (
        STRICT
        | {
            "json_schema": {
                **STRICT["json_schema"],
                "schema": {
                    **GRADE,
                    "properties": {**GRADE["properties"], "reason": {"type": "string", "format": "uri"}},
                },
            }
        },
        "Invalid schema for response_format 'grade': In context=('properties', 'reason'), 'uri' is not a "
        "valid format.",
        "invalid_json_schema",
    ),
]


@pytest.mark.parametrize(("response_format", "says", "code"), OPENAI_BAD_FORMATS)
def test_openai_refuses_malformed_response_formats(
    http: httpx.Client, response_format: dict[str, Any], says: str, code: str
) -> None:
    r = openai_post(
        http,
        {
            "model": "gpt-4.1",
            "messages": [{"role": "user", "content": ASK_GRADE}],
            "response_format": response_format,
        },
    )
    assert r.status_code == 400
    assert_shape(load("openai/error_400_unsupported_parameter.json"), r.json())
    error = r.json()["error"]
    assert (error["message"], error["code"], error["type"]) == (says, code, "invalid_request_error")


def user_parts(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


def image_url(url: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


OPENAI_BAD_IMAGES = [
    (
        user_parts({"type": "image_url", "image_url": "https://example.com/a.png"}),
        "Invalid type for 'messages[0].content[1].image_url': expected an object, but got a string instead.",
        "messages[0].content[1].image_url",
        "invalid_type",
    ),
    (
        user_parts({"type": "image_url", "image_url": {}}),
        "Missing required parameter: 'messages[0].content[1].image_url.url'.",
        "messages[0].content[1].image_url.url",
        "missing_required_parameter",
    ),
    (
        user_parts(image_url("https://example.com/a.png", detail="huge")),
        "Invalid value: 'huge'. Supported values are: 'auto', 'low', and 'high'.",
        "messages[0].content[1].image_url.detail",
        "invalid_value",
    ),
    (
        user_parts(image_url("data:image/svg+xml;base64,PHN2Zy8+")),
        "You uploaded an unsupported image. Please make sure your image has of one the following formats: "
        "['png', 'jpeg', 'gif', 'webp'].",
        None,
        "invalid_image_format",
    ),
    (
        user_parts(image_url("data:image/png;base64,not*base64")),
        "You uploaded an unsupported image. Please make sure your image is valid.",
        None,
        "invalid_image_format",
    ),
    (
        user_parts(image_url("data:image/png;base64," + base64.b64encode(b"plain text, no image").decode())),
        "You uploaded an unsupported image. Please make sure your image is valid.",
        None,
        "invalid_image_format",
    ),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [image_url(data_url(8, 8))]},
        ],
        "Invalid 'messages[1]'. Image URLs are only allowed for messages with role 'user', but this "
        "message with role 'assistant' contains an image URL.",
        "messages[1]",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(("messages", "says", "param", "code"), OPENAI_BAD_IMAGES)
def test_openai_refuses_malformed_images(
    http: httpx.Client, messages: list[Any], says: str, param: str | None, code: str
) -> None:
    r = openai_post(http, {"model": "gpt-4.1", "messages": messages})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": says,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }


def test_a_model_without_vision_refuses_an_image_in_its_apis_words(http: httpx.Client) -> None:
    messages = user_parts(image_url(data_url(8, 8)))
    r = openai_post(http, {"model": "gpt-3.5-turbo", "messages": messages})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Invalid content type. image_url is only supported by certain models.",
        "type": "invalid_request_error",
        "param": "messages.[0].content.[1].type",
        "code": None,
    }
    assert sim_requests(http)[-1]["refused"] == r.json()["error"]["message"]
    # The profile decides against the name, both ways.
    blind = FAST.model_copy(update={"vision": False})
    seeing = FAST.model_copy(update={"vision": True})
    http.put("/admin/profile", json=profile(**{"gpt-4.1": blind, "my-local-vlm": seeing})).raise_for_status()
    assert openai_post(http, {"model": "gpt-4.1", "messages": messages}).status_code == 400
    assert openai_post(http, {"model": "my-local-vlm", "messages": messages}).status_code == 200
    # A llama.cpp server without --mmproj refuses with its own 500.
    local = FAST.model_copy(update={"server": "llama.cpp", "context_window": 4096})
    http.put("/admin/profile", json=profile(smol=local)).raise_for_status()
    r = openai_post(http, {"model": "smol", "messages": messages})
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "code": 500,
            "message": "image input is not supported - hint: if this is unexpected, you may need to "
            "provide the mmproj",
            "type": "server_error",
        }
    }


def test_vision_by_model_name() -> None:
    seeing = [
        "gpt-4o",
        "gpt-4.1-mini",
        "gpt-5.4",
        "o3",
        "o4-mini",
        "claude-sonnet-4-6",
        "claude-3-haiku-20240307",
        "gemini-2.5-flash",
    ]
    blind = ["gpt-3.5-turbo", "o3-mini", "o1-mini", "claude-3-5-haiku-latest", "smollm2", "llama-3-8b"]
    assert [m for m in seeing if not vision_capable(m)] == []
    assert [m for m in blind if vision_capable(m)] == []


def anthropic_image(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "source": source}, {"type": "text", "text": "What is this?"}],
            }
        ],
    }


PNG_B64 = base64.b64encode(image_bytes(8, 8)).decode()
ANTHROPIC_BAD = [
    (
        anthropic_image({"type": "base64", "media_type": "image/bmp", "data": PNG_B64}),
        "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
        "'image/gif' or 'image/webp'",
    ),
    (
        anthropic_image({"type": "base64", "media_type": "image/png", "data": ""}),
        "messages.0.content.0.image.source.base64: image cannot be empty",
    ),
    (
        anthropic_image({"type": "base64", "media_type": "image/png", "data": "not*base64"}),
        "messages.0.content.0.image.source.base64: invalid base64 data",
    ),
    (
        anthropic_image(
            {"type": "base64", "media_type": "image/png", "data": base64.b64encode(b"not an image").decode()}
        ),
        "Could not process image",
    ),
    (
        anthropic_image({"type": "base64", "media_type": "image/jpeg", "data": PNG_B64}),
        "messages.0.content.0.image.source.base64.data: Image does not match the provided media type "
        "image/jpeg",
    ),
    (
        anthropic_image({"type": "link", "url": "https://example.com/a.png"}),
        "messages.0.content.0.image.source: Input tag 'link' found using 'type' does not match any of the "
        "expected tags: 'base64', 'file', 'url'",
    ),
    (
        load("anthropic/structured_output.request.json")
        | {
            "output_config": {
                "format": {"type": "json_schema", "schema": {**CONTACT, "additionalProperties": True}}
            }
        },
        "output_config.format.schema: For 'object' type, 'additionalProperties' must be explicitly set to "
        "false",
    ),
    (
        load("anthropic/structured_output.request.json")
        | {
            "output_config": {
                "format": {
                    "type": "json_schema",
                    "schema": {
                        **GRADE,
                        "properties": {**GRADE["properties"], "score": {"type": "integer", "minimum": 0}},
                    },
                }
            }
        },
        "output_config.format.schema: For 'integer' type, property 'minimum' is not supported (at "
        "properties.score)",
    ),
    (
        load("anthropic/structured_output.request.json") | {"output_config": {"format": {"type": "json"}}},
        "output_config.format.type: Input should be 'json_schema'",
    ),
    (
        load("anthropic/structured_output.request.json")
        | {"output_config": {"format": {"type": "json_schema"}}},
        "output_config.format.schema: Field required",
    ),
]


@pytest.mark.parametrize(("body", "says"), ANTHROPIC_BAD)
def test_anthropic_refuses_malformed_images_and_formats(
    http: httpx.Client, body: dict[str, Any], says: str
) -> None:
    r = http.post("/v1/messages", json=body, headers=ANTHROPIC_AUTH)
    assert r.status_code == 400
    assert_shape(load("anthropic/error_404_not_found.json"), r.json())
    assert r.json()["error"] == {"type": "invalid_request_error", "message": says}


def gemini_image(mime: Any, data: str) -> dict[str, Any]:
    return {
        "contents": [
            {"parts": [{"text": "What is this?"}, {"inline_data": {"mime_type": mime, "data": data}}]}
        ]
    }


def gemini_format(**config: Any) -> dict[str, Any]:
    return {"contents": [{"parts": [{"text": ASK_GRADE}]}], "generationConfig": config}


GEMINI_BAD = [
    (
        gemini_image("image/png", "not*base64"),
        "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding failed for "
        '"not*base64"',
    ),
    (gemini_image("image/jpg", PNG_B64), "Unsupported MIME type: image/jpg"),
    (
        gemini_image("image/png", base64.b64encode(b"not an image").decode()),
        "Unable to process input image. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    (
        gemini_format(responseMimeType="application/xml+json"),
        "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
        "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`.",
    ),
    (
        gemini_format(responseMimeType="application/json", responseSchema=GRADE, responseJsonSchema=GRADE),
        "response_schema must not be set when response_json_schema is set.",
    ),
    (
        gemini_format(responseMimeType="application/json", responseSchema={"$schema": "x", "type": "OBJECT"}),
        "Invalid JSON payload received. Unknown name \"$schema\" at 'generation_config.response_schema': "
        "Cannot find field.",
    ),
    (
        gemini_format(
            responseMimeType="application/json",
            responseSchema={
                "type": "OBJECT",
                "properties": {"a": {"type": "STRING", "title": "A", "additionalProperties": False}},
            },
        ),
        'Invalid JSON payload received. Unknown name "additionalProperties" at '
        "'generation_config.response_schema.properties[0].value': Cannot find field.",
    ),
    (
        gemini_format(
            responseMimeType="application/json",
            responseSchema={"type": "OBJECT", "properties": {"a": {"type": ["STRING", "NULL"]}}},
        ),
        'Invalid JSON payload received. Unknown name "type" at '
        "'generation_config.response_schema.properties[0].value': Proto field is not repeating, cannot "
        "start list.",
    ),
    (
        gemini_format(
            responseMimeType="application/json",
            responseSchema={"type": "OBJECT", "properties": {"a": {"type": "OBJECT"}}},
        ),
        '* GenerateContentRequest.generation_config.response_schema.properties["a"].properties: should be '
        "non-empty for OBJECT type",
    ),
    (
        gemini_format(
            responseMimeType="application/json",
            responseSchema={"type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "required": ["b"]},
        ),
        "* GenerateContentRequest.generation_config.response_schema.required[0]: property is not defined",
    ),
    (
        gemini_format(responseMimeType="application/json")
        | {
            "tools": [
                {
                    "functionDeclarations": [
                        {
                            "name": "f",
                            "parameters": {"type": "OBJECT", "properties": {"x": {"type": "STRING"}}},
                        }
                    ]
                }
            ]
        },
        "Function calling with a response mime type: 'application/json' is unsupported",
    ),
]


@pytest.mark.parametrize(("body", "says"), GEMINI_BAD)
def test_gemini_refuses_malformed_images_and_formats(
    http: httpx.Client, body: dict[str, Any], says: str
) -> None:
    r = gemini_post(http, body)
    assert r.status_code == 400
    assert_shape(load("gemini/error_503_unavailable.json"), r.json())
    assert r.json()["error"] == {"code": 400, "message": says, "status": "INVALID_ARGUMENT"}


def test_gemini_3_takes_function_calling_with_json(http: httpx.Client) -> None:
    body = gemini_format(responseMimeType="application/json") | {
        "tools": [
            {
                "functionDeclarations": [
                    {"name": "f", "parameters": {"type": "OBJECT", "properties": {"x": {"type": "STRING"}}}}
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
    }
    r = gemini_post(http, body, model="gemini-3-pro-preview")
    assert r.status_code == 200
    json.loads(r.json()["candidates"][0]["content"]["parts"][0]["text"])


# -- images: measured from their headers, billed by each provider's rule ---------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("WEBP", {"lossless": False}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_image_headers_give_format_and_size(fmt: str, kwargs: dict[str, Any]) -> None:
    for size in [(1, 1), (640, 480), (3000, 17)]:
        buf = io.BytesIO()
        PILImage.new("RGB", size).save(buf, fmt, **kwargs)
        found = sniff(buf.getvalue())
        assert found == ("image/" + fmt.lower(), *size)
    alpha = io.BytesIO()
    PILImage.new("RGBA", (300, 200)).save(alpha, "WEBP")  # an extended (VP8X) WebP
    assert sniff(alpha.getvalue()) == ("image/webp", 300, 200)
    assert sniff(b"GIF8") is None and sniff(b"no image at all") is None


def test_token_rules_match_the_published_examples() -> None:
    # OpenAI's vision guide: 1024x1024 high is 765 tokens, 2048x4096 high 1105, anything low 85.
    assert (
        openai_tokens(1024, 1024, "high"),
        openai_tokens(2048, 4096, "high"),
        openai_tokens(4096, 8192, "low"),
    ) == (765, 1105, 85)
    # Anthropic's vision guide: about 1,334 tokens for 1000x1000, 1,590 for 1092x1092.
    assert (anthropic_tokens(1000, 1000), anthropic_tokens(1092, 1092)) == (1334, 1590)
    # Gemini: 258 for an image up to 384px both ways, 258 per 768px tile beyond.
    assert (gemini_tokens(384, 384), gemini_tokens(1024, 1024), gemini_tokens(1536, 768)) == (258, 1032, 516)


def test_images_are_billed_by_each_providers_rule(http: httpx.Client, gem: genai.Client) -> None:
    def openai_prompt(*parts: Any) -> int:
        body = {"model": "gpt-4.1", "messages": user_parts(*parts)}
        return int(openai_post(http, body).json()["usage"]["prompt_tokens"])

    base = openai_prompt()
    assert openai_prompt(image_url(data_url(640, 480))) - base == openai_tokens(640, 480, "high") == 425
    assert openai_prompt(image_url(data_url(640, 480), detail="low")) - base == 85
    assert openai_prompt(image_url(data_url(3000, 1000, "JPEG"), detail="high")) - base == openai_tokens(
        3000, 1000, "high"
    )
    text_only = gem.models.generate_content(model="gemini-2.5-flash", contents=["What is this?"])
    tall = gem.models.generate_content(
        model="gemini-2.5-flash",
        contents=[
            genai_types.Part.from_bytes(data=image_bytes(800, 1600), mime_type="image/png"),
            "What is this?",
        ],
    )
    assert tall.usage_metadata and text_only.usage_metadata
    assert (
        (tall.usage_metadata.prompt_token_count or 0) - (text_only.usage_metadata.prompt_token_count or 0)
        == gemini_tokens(800, 1600)
        == 1548
    )
    assert "a 800x1600 PNG" in (tall.text or "")


def test_the_answer_acknowledges_the_last_questions_images(oai: openai.OpenAI) -> None:
    two = oai.chat.completions.create(
        model="gpt-4.1",
        messages=user_parts(image_url(data_url(32, 16, "GIF")), image_url(data_url(20, 10, "WEBP"))),
    )
    assert (two.choices[0].message.content or "").startswith(
        "Looking at the 2 images you sent (a 32x16 GIF; a 20x10 WebP): "
    )
    later: Any = [
        *user_parts(image_url(data_url(32, 16))),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Thanks. And in one word?"},
    ]
    answer = oai.chat.completions.create(model="gpt-4.1", messages=later).choices[0].message.content or ""
    assert "Looking at" not in answer  # the image was the earlier question's


def test_claude_writes_required_properties_first(http: httpx.Client) -> None:
    """Claude orders a document's required properties first, then the optional ones (the
    structured outputs guide's "Property ordering"); OpenAI keeps the schema's order."""
    schema = {
        "type": "object",
        "properties": {"notes": {"type": "string"}, "name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Describe Ada Lovelace, aged 36, in JSON."}]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 256, "messages": ask}
    body |= {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    claude_doc = json.loads(
        http.post("/v1/messages", json=body, headers=ANTHROPIC_AUTH).json()["content"][0]["text"]
    )
    assert list(claude_doc) == ["name", "notes", "age"] and claude_doc["age"] == 36
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    openai_doc = json.loads(
        openai_post(http, {"model": "gpt-4.1", "messages": ask, "response_format": rf}).json()["choices"][0][
            "message"
        ]["content"]
    )
    assert list(openai_doc) == ["notes", "name", "age"]


def test_a_document_cut_at_max_tokens_is_malformed_and_carries_no_acknowledgement(http: httpx.Client) -> None:
    body = grade_body() | {"max_tokens": 4}
    choice = openai_post(http, body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])
    shown = grade_body()
    shown["messages"] = user_parts(image_url(data_url(16, 16)))
    shown["messages"][0]["content"][0]["text"] = ASK_GRADE
    document = json.loads(openai_post(http, shown).json()["choices"][0]["message"]["content"])
    jsonschema.validate(document, GRADE)  # the document alone: no sentence about the image


def test_a_format_asked_for_in_words_is_followed_as_a_loose_one(
    http: httpx.Client, claude: anthropic.Anthropic, gem: genai.Client
) -> None:
    """The service states the format in the system prompt of every model it asks for one
    (``moa.engine.structured.instruction``): a simulated model follows it on every wire, as it
    follows a native format whose decoding is not held to the schema (its errors included), so a
    server or adapter without native structured outputs is simulated too."""
    from moa.engine.structured import instruction
    from moa.types import ResponseFormat

    fmt = ResponseFormat(type="json_schema", name="grade", schema=GRADE)
    system = "You are a grader.\n\n" + instruction(fmt)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": ASK_GRADE}]
    r = openai_post(http, {"model": "gpt-4.1", "messages": messages})
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), GRADE)
    said = claude.messages.create(
        model="claude-haiku-4-5", max_tokens=500, system=system, messages=[messages[1]]
    )  # type: ignore[arg-type]
    jsonschema.validate(json.loads(said.content[0].text), GRADE)  # type: ignore[union-attr]
    config = genai_types.GenerateContentConfig(system_instruction=system)
    jsonschema.validate(
        json.loads(
            gem.models.generate_content(model="gemini-2.5-flash", contents=ASK_GRADE, config=config).text
            or ""
        ),
        GRADE,
    )
    plain = openai_post(http, {"model": "gpt-4.1", "messages": [messages[1]]}).json()
    with pytest.raises(ValueError):
        json.loads(plain["choices"][0]["message"]["content"])  # prose when nothing asks for JSON
    asked = {"role": "system", "content": instruction(ResponseFormat(type="json_object"))}
    obj = openai_post(http, {"model": "gpt-4.1", "messages": [asked, messages[1]]}).json()
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)
    broken = erring(http, malformed_json=1.0)
    bad = openai_post(http, {"model": broken, "messages": messages}).json()
    with pytest.raises(ValueError):
        json.loads(bad["choices"][0]["message"]["content"])
