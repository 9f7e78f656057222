"""The simulator's tool calling, on all three wires, as the official SDKs and the published bodies see it.

Three directions:

- fidelity: the providers' published tool-call examples (tests/fixtures/providers, provenance in
  its README) go through the simulator, and its bodies and stream events must have their shape,
  field by field and element by element;
- behaviour: the real ``openai``, ``anthropic`` and ``google-genai`` clients run an agent loop
  against it (a call, the tool's result, the answer), streaming and not, with every tool choice;
- faults: each tool error a model's profile can inject, at rate 1.0, produces exactly the fault it
  names, deterministically by seed; malformed requests are refused in each provider's own shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from moa.simulator.profile import ModelProfile, SimProfile, ToolErrors
from moa.simulator.server import SimulatorServer
from tests.conftest import SIM_KEY as KEY
from tests.helpers import sim_requests, sim_stats
from tests.test_fidelity import assert_shape, collapse, load, raw, sse_events

OPENAI_AUTH = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC_AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GEMINI_AUTH = {"x-goog-api-key": KEY}

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Get the current time in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string"}, "hours": {"type": "integer"}},
        "required": ["timezone", "hours"],
    },
}
ASK = "What is the weather like in Boston today?"


def oai_tools(*fns: dict[str, Any]) -> Any:
    return [{"type": "function", "function": f} for f in fns]


def claude_tools(*fns: dict[str, Any]) -> Any:
    return [
        {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]} for f in fns
    ]


def gemini_tools(*fns: dict[str, Any]) -> list[genai_types.Tool]:
    return [genai_types.Tool(function_declarations=[genai_types.FunctionDeclaration(**f) for f in fns])]


def profile(**models: dict[str, Any]) -> dict[str, Any]:
    fast = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)
    entries = {
        name: fast.model_copy(update={"tool_errors": ToolErrors(**errors)}) for name, errors in models.items()
    }
    return SimProfile(default=fast, models=entries).model_dump(mode="json")


@pytest.fixture
def http(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        client.put("/admin/profile", json=profile()).raise_for_status()
        yield client


def gemini_config(*fns: dict[str, Any], **calling: Any) -> genai_types.GenerateContentConfig:
    tool_config = (
        genai_types.ToolConfig(function_calling_config=genai_types.FunctionCallingConfig(**calling))
        if calling
        else None
    )
    return genai_types.GenerateContentConfig(
        tools=gemini_tools(*fns),  # type: ignore[arg-type]
        tool_config=tool_config,
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
    )


# -- fidelity: the published examples ------------------------------------------------------------------


def test_openai_tool_call_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", json=load("openai/chat_completion_tools.request.json"), headers=OPENAI_AUTH
    )
    assert r.status_code == 200
    # The Functions example predates the message's refusal and annotations, the usage's prompt and
    # audio details, service_tier and (it drops it) system_fingerprint: the plain completion's
    # shape test holds those against the reference that shows them.
    optional = frozenset(
        {
            "$.choices[].message.refusal",
            "$.choices[].message.annotations",
            "$.usage.prompt_tokens_details",
            "$.usage.completion_tokens_details.audio_tokens",
            "$.service_tier",
            "$.system_fingerprint",
        }
    )
    body = r.json()
    assert_shape(load("openai/chat_completion_tools.response.json"), body, optional)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_current_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Boston"}


def openai_chunk_kind(data: Any) -> str:
    if data == "[DONE]":
        return "done"
    choice = data["choices"][0]
    if choice["finish_reason"]:
        return "finish"
    delta = choice["delta"]
    if "role" in delta:
        return "role"
    return "tool_open" if "id" in delta["tool_calls"][0] else "tool_arguments"


def test_openai_tool_call_stream_has_the_reference_shape(http: httpx.Client) -> None:
    body = load("openai/chat_completion_tools.stream.request.json")
    r = http.post("/v1/chat/completions", json=body, headers=OPENAI_AUTH)
    assert r.status_code == 200
    ref = [d for _, d in sse_events(raw("openai/chat_completion_tools.stream.sse"))]
    got = [d for _, d in sse_events(r.content)]
    assert collapse([openai_chunk_kind(d) for d in got]) == collapse([openai_chunk_kind(d) for d in ref])
    by_kind = {openai_chunk_kind(d): d for d in ref}
    for data in got[:-1]:
        assert_shape(by_kind[openai_chunk_kind(data)], data, frozenset({"$.service_tier"}))
    fragments = "".join(
        d["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for d in got
        if openai_chunk_kind(d) in ("tool_open", "tool_arguments")
    )
    assert json.loads(fragments) == {"location": "Boston"}


def test_anthropic_tool_use_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=load("anthropic/tool_use.request.json"), headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    body = r.json()
    # The guide's example leaves out type, stop_sequence and usage (the plain message's shape test
    # holds those), and shows a unit its request does not declare; caller is newer than it (the
    # SDK's own tool-use stream fixture carries it).
    optional = frozenset(
        {"$.type", "$.stop_sequence", "$.usage", "$.content[].caller", "$.content[].input.unit"}
    )
    assert_shape(load("anthropic/tool_use.response.json"), body, optional)
    assert body["stop_reason"] == "tool_use"
    text, use = body["content"]
    assert text["type"] == "text" and text["text"]
    assert use["id"].startswith("toolu_01") and use["name"] == "get_weather"
    assert use["input"] == {"location": "San Francisco"}


def anthropic_event_kind(name: str | None, data: Any) -> str:
    block = data.get("content_block") or data.get("delta") or {}
    return f"{name}:{block.get('type', '')}"


def test_anthropic_tool_use_stream_has_the_reference_events(http: httpx.Client) -> None:
    body = {**load("anthropic/tool_use.request.json"), "stream": True}
    r = http.post("/v1/messages", json=body, headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    ref, got = sse_events(raw("anthropic/tool_use.stream.sse")), sse_events(r.content)
    assert collapse([anthropic_event_kind(n, d) for n, d in got]) == collapse(
        [anthropic_event_kind(n, d) for n, d in ref]
    )
    by_kind = {anthropic_event_kind(n, d): d for n, d in ref}
    for name, data in got:
        usage = frozenset(f"$.message.usage.{k}" for k in data.get("message", {}).get("usage", {}))
        assert_shape(
            by_kind[anthropic_event_kind(name, data)], data, usage - {"$.message.usage.input_tokens"}
        )
    partial = "".join(d["delta"].get("partial_json", "") for n, d in got if n == "content_block_delta")
    assert json.loads(partial) == {"location": "San Francisco"}


def test_anthropic_tool_result_request_is_answered_from_the_result(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=load("anthropic/tool_result.request.json"), headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["stop_reason"] == "end_turn" and [b["type"] for b in body["content"]] == ["text"]
    assert "15 degrees" in body["content"][0]["text"]


# Newer than the 2024 cookbook: usage, model version, response id, finish message (the captured
# stream shows them); the cookbook's safety ratings and prompt feedback the simulator rates nothing for.
GEMINI_CALL_OPTIONAL = frozenset(
    {
        "$.usageMetadata",
        "$.modelVersion",
        "$.responseId",
        "$.candidates[].finishMessage",
        "$.candidates[].safetyRatings",
        "$.promptFeedback",
    }
)


def gemini_post(http: httpx.Client, fixture: str, action: str = "generateContent") -> httpx.Response:
    """A fixture's request body to gemini-2.5-flash; the answer, which must be a 200."""
    r = http.post(f"/v1beta/models/gemini-2.5-flash:{action}", json=load(fixture), headers=GEMINI_AUTH)
    assert r.status_code == 200
    return r


def test_gemini_function_call_has_the_reference_shape(http: httpx.Client) -> None:
    r = gemini_post(http, "gemini/function_call.request.json")
    body = r.json()
    assert_shape(load("gemini/function_call.response.json"), body, GEMINI_CALL_OPTIONAL)
    call = body["candidates"][0]["content"]["parts"][0]["functionCall"]
    assert call == {"name": "find_theaters", "args": {"location": "Mountain View", "movie": "Barbie"}}


def test_gemini_function_call_stream_has_the_captured_shape(http: httpx.Client) -> None:
    r = gemini_post(http, "gemini/function_call.stream.request.json", "streamGenerateContent?alt=sse")
    assert r.content.endswith(b"\r\n\r\n")
    (ref,) = [d for _, d in sse_events(raw("gemini/function_call.stream.sse"))]
    (got,) = [d for _, d in sse_events(r.content)]
    # A thinking model's signature and thought tokens: the simulated model thinks nothing.
    thinking = frozenset(
        {"$.candidates[].content.parts[].thoughtSignature", "$.usageMetadata.thoughtsTokenCount"}
    )
    assert_shape(ref, got, thinking)
    assert got["candidates"][0]["finishMessage"] == ref["candidates"][0]["finishMessage"]


def test_gemini_function_response_request_is_answered_in_text(http: httpx.Client) -> None:
    r = gemini_post(http, "gemini/function_response.request.json")
    assert_shape(
        load("gemini/function_response.response.json"),
        r.json(),
        frozenset({"$.usageMetadata", "$.modelVersion", "$.responseId", "$.candidates[].safetyRatings"}),
    )
    assert "AMC Mountain View 16" in r.json()["candidates"][0]["content"]["parts"][0]["text"]


# -- behaviour: the SDKs' agent loops --------------------------------------------------------------------


def test_openai_sdk_agent_loop_plain_and_streamed(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": ASK}]
    first = oai.chat.completions.create(model="gpt-4.1", messages=messages, tools=oai_tools(WEATHER))
    (call,) = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Boston"}
    # The SDK's own stream accumulator assembles the same call from the deltas.
    with oai.chat.completions.stream(model="gpt-4.1", messages=messages, tools=oai_tools(WEATHER)) as stream:
        streamed = stream.get_final_completion()
    (again,) = streamed.choices[0].message.tool_calls or []
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert (again.function.name, again.function.arguments) == (call.function.name, call.function.arguments)
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    final = oai.chat.completions.create(model="gpt-4.1", messages=messages, tools=oai_tools(WEATHER))
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert '{"temperature": 18}' in (final.choices[0].message.content or "")


def test_anthropic_sdk_agent_loop_plain_and_streamed(claude: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": ASK}]
    first = claude.messages.create(
        model="claude-sonnet-4-6", max_tokens=512, messages=messages, tools=claude_tools(WEATHER)
    )
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["text", "tool_use"]
    use = first.content[1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"location": "Boston"}
    with claude.messages.stream(
        model="claude-sonnet-4-6", max_tokens=512, messages=messages, tools=claude_tools(WEATHER)
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [
        ("text", None),
        ("tool_use", {"location": "Boston"}),
    ]
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees"}],
        },
    ]
    final = claude.messages.create(
        model="claude-sonnet-4-6", max_tokens=512, messages=messages, tools=claude_tools(WEATHER)
    )
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    assert "18 degrees" in final.content[0].text


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-pro-preview"])
def test_gemini_sdk_agent_loop_plain_and_streamed(gem: genai.Client, model: str) -> None:
    config = gemini_config(WEATHER)
    first = gem.models.generate_content(model=model, contents=ASK, config=config)
    (call,) = first.function_calls or []
    assert call.name == "get_weather" and call.args == {"location": "Boston"}
    # Gemini 3 numbers its calls (and expects the id back); earlier models do not.
    assert bool(call.id) is model.startswith("gemini-3")
    chunks = list(gem.models.generate_content_stream(model=model, contents=ASK, config=config))
    streamed = [c for chunk in chunks for c in chunk.function_calls or []]
    assert [(c.name, c.args) for c in streamed] == [(call.name, call.args)]
    assert first.candidates and first.candidates[0].content
    contents = [
        genai_types.Content(role="user", parts=[genai_types.Part(text=ASK)]),
        first.candidates[0].content,
        genai_types.Content(
            role="user",
            parts=[
                genai_types.Part(
                    function_response=genai_types.FunctionResponse(
                        id=call.id, name="get_weather", response={"temperature": 18}
                    )
                )
            ],
        ),
    ]
    final = gem.models.generate_content(model=model, contents=contents, config=config)
    assert not final.function_calls and '"temperature": 18' in (final.text or "")


def test_openai_tool_choice_and_parallel_calls(oai: openai.OpenAI, http: httpx.Client) -> None:
    tools = oai_tools(WEATHER, TIME)
    ask: Any = [{"role": "user", "content": "Use get_weather for Boston and get_time for Europe in 3 hours."}]

    def calls(**kw: Any) -> list[tuple[str, dict[str, Any]]]:
        c = oai.chat.completions.create(model="gpt-4.1", messages=ask, tools=tools, **kw)
        return [
            (k.function.name, json.loads(k.function.arguments)) for k in c.choices[0].message.tool_calls or []
        ]

    both = [("get_weather", {"location": "Boston"}), ("get_time", {"timezone": "Europe", "hours": 3})]
    assert calls() == both
    assert calls(parallel_tool_calls=False) == both[:1]
    assert calls(tool_choice={"type": "function", "function": {"name": "get_time"}}) == both[1:]
    assert calls(tool_choice="required") == both
    none = oai.chat.completions.create(model="gpt-4.1", messages=ask, tools=tools, tool_choice="none")
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.content
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": tools[1:]}}
    assert calls(tool_choice=allowed) == both[1:]
    seen = sim_requests(http)[-1]["tools"]  # what GET /admin/requests says the request offered
    assert seen == {
        "names": ["get_weather", "get_time"],
        "choice": "required",
        "allowed": ["get_time"],
        "parallel": True,
    }
    # Several quoted values for one function's argument: one call each.
    quoted: Any = [{"role": "user", "content": 'Weather in "Paris", "Oslo" and "Rome"?'}]
    c = oai.chat.completions.create(model="gpt-4.1", messages=quoted, tools=oai_tools(WEATHER))
    places = [json.loads(k.function.arguments)["location"] for k in c.choices[0].message.tool_calls or []]
    assert places == ["Paris", "Oslo", "Rome"]


def test_openai_legacy_functions_answer_with_function_call(oai: openai.OpenAI, http: httpx.Client) -> None:
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": ASK}], "functions": [WEATHER]}
    r = http.post("/v1/chat/completions", json=body, headers=OPENAI_AUTH).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_weather"
    streamed = http.post("/v1/chat/completions", json=body | {"stream": True}, headers=OPENAI_AUTH)
    deltas = [d["choices"][0]["delta"] for _, d in sse_events(streamed.content)[:-1]]
    arguments = "".join(d.get("function_call", {}).get("arguments", "") for d in deltas)
    assert json.loads(arguments) == {"location": "Boston"}
    reply = {"role": "function", "name": "get_weather", "content": "18 degrees"}
    turn2 = body | {"messages": [*body["messages"], choice["message"], reply]}
    answer = http.post("/v1/chat/completions", json=turn2, headers=OPENAI_AUTH).json()["choices"][0]
    assert answer["finish_reason"] == "stop" and "18 degrees" in answer["message"]["content"]
    none = http.post("/v1/chat/completions", json=body | {"function_call": "none"}, headers=OPENAI_AUTH)
    assert none.json()["choices"][0]["finish_reason"] == "stop"


def test_anthropic_tool_choice_and_parallel_calls(claude: anthropic.Anthropic) -> None:
    ask: Any = [{"role": "user", "content": "Use get_weather for Boston and get_time for Europe in 3 hours."}]

    def blocks(**kw: Any) -> list[tuple[str, Any]]:
        m = claude.messages.create(
            model="claude-sonnet-4-6", max_tokens=512, messages=ask, tools=claude_tools(WEATHER, TIME), **kw
        )
        return [(b.type, getattr(b, "name", None)) for b in m.content]

    assert blocks() == [("text", None), ("tool_use", "get_weather"), ("tool_use", "get_time")]
    # Under any and tool the API prefills the call: no text before it.
    assert blocks(tool_choice={"type": "any"}) == [("tool_use", "get_weather"), ("tool_use", "get_time")]
    assert blocks(tool_choice={"type": "tool", "name": "get_time"}) == [("tool_use", "get_time")]
    single = {"type": "auto", "disable_parallel_tool_use": True}
    assert blocks(tool_choice=single) == [("text", None), ("tool_use", "get_weather")]
    assert blocks(tool_choice={"type": "none"}) == [("text", None)]


def test_gemini_calling_modes(gem: genai.Client) -> None:
    ask = "Use get_weather for Boston and get_time for Europe in 3 hours."

    def names(**calling: Any) -> list[str | None]:
        r = gem.models.generate_content(
            model="gemini-2.5-flash", contents=ask, config=gemini_config(WEATHER, TIME, **calling)
        )
        return [c.name for c in r.function_calls or []]

    assert names() == ["get_weather", "get_time"]
    assert names(mode="ANY", allowed_function_names=["get_time"]) == ["get_time"]
    assert names(mode="NONE") == []


# -- refusals in each provider's words ----------------------------------------------------------------

# An assistant turn that called a tool, as a conversation's start.
CALLED: list[dict[str, Any]] = [
    {"role": "user", "content": ASK},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
]
OPENAI_BAD = [
    ({"tools": []}, "Invalid 'tools': empty array.", "tools"),
    (
        {"tools": [{"type": "function", "function": {}}]},
        "Missing required parameter: 'tools[0].function.name'.",
        None,
    ),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "string does not match pattern", None),
    ({"tool_choice": "auto"}, "'tool_choice' is only allowed when 'tools' are specified.", "tool_choice"),
    (
        {"parallel_tool_calls": False},
        "'parallel_tool_calls' is only allowed when 'tools' are specified.",
        None,
    ),
    (
        {"tools": oai_tools(WEATHER), "tool_choice": "sometimes"},
        "Supported values are: 'none', 'auto', and",
        None,
    ),
    (
        {"tools": [{"type": "function", "function": {**WEATHER, "strict": True}}]},
        "'additionalProperties' is required to be supplied and to be false.",
        None,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": ASK},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
            ]
        },
        "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
        "messages.[1].role",
    ),
    (
        {"messages": [*CALLED, {"role": "user", "content": "and?"}]},
        "The following tool_call_ids did not have response messages: call_1",
        "messages.[1].role",
    ),
    (  # answered, but not right after the call
        {
            "messages": [
                *CALLED,
                {"role": "user", "content": "and?"},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
            ]
        },
        "The following tool_call_ids did not have response messages: call_1",
        "messages.[1].role",
    ),
]


@pytest.mark.parametrize(("change", "says", "param"), OPENAI_BAD)
def test_openai_refuses_malformed_tool_requests(
    http: httpx.Client, change: dict[str, Any], says: str, param: str | None
) -> None:
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": ASK}]} | change
    r = http.post("/v1/chat/completions", json=body, headers=OPENAI_AUTH)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if error["code"] is not None:
        assert_shape(load("openai/error_400_unsupported_parameter.json"), r.json())
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param


ANTHROPIC_BAD = [
    ({"tools": [{"name": "get_weather"}]}, "tools.0.custom.input_schema: Field required"),
    (
        {"tools": [{"name": "a b", "input_schema": {"type": "object"}}]},
        "tools.0.custom.name: String should match",
    ),
    (
        {"tools": [{"name": "f", "input_schema": {"type": "array"}}]},
        "input_schema.type: Input should be 'object'",
    ),
    (
        {"tools": claude_tools(WEATHER), "tool_choice": {"type": "maybe"}},
        "Input tag 'maybe' found using 'type'",
    ),
    (
        {"tools": claude_tools(WEATHER), "tool_choice": {"type": "tool"}},
        "tool_choice.tool.name: Field required",
    ),
    (
        {
            "tools": claude_tools(WEATHER),
            "messages": [
                {"role": "user", "content": ASK},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
                },
                {"role": "user", "content": "hello"},
            ],
        },
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1.",
    ),
    (
        {
            "tools": claude_tools(WEATHER),
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}],
        },
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9.",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]},
        "Requests which include `tool_use` or `tool_result` blocks must define tools.",
    ),
]


@pytest.mark.parametrize(("change", "says"), ANTHROPIC_BAD)
def test_anthropic_refuses_malformed_tool_requests(
    http: httpx.Client, change: dict[str, Any], says: str
) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": ASK}]}
    r = http.post("/v1/messages", json=body | change, headers=ANTHROPIC_AUTH)
    assert r.status_code == 400
    assert_shape(load("anthropic/error_404_not_found.json"), r.json())
    assert r.json()["error"]["type"] == "invalid_request_error" and says in r.json()["error"]["message"]


CALL_TURN = {
    "role": "model",
    "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Oslo"}}}],
}
GEMINI_BAD = [
    ({"tools": [{"functionDeclarations": [{"name": "1bad"}]}]}, "Invalid function name."),
    ({"tools": [{"functionDeclarations": [{"name": "f", "colour": 1}]}]}, 'Unknown name "colour"'),
    ({"tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "THING"}}]}]}, '"THING"'),
    (
        {"tools": gemini_tools(WEATHER), "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}}},
        "Invalid value at 'tool_config.function_calling_config.mode'",
    ),
    ({"contents": [CALL_TURN]}, "function call turn comes immediately after a user turn"),
    (
        {
            "contents": [
                {"role": "user", "parts": [{"text": ASK}]},
                {"role": "model", "parts": [CALL_TURN["parts"][0], CALL_TURN["parts"][0]]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {}}}]},
            ]
        },
        "the number of function response parts is equal to the number of function call parts",
    ),
]


@pytest.mark.parametrize(("change", "says"), GEMINI_BAD)
def test_gemini_refuses_malformed_tool_requests(
    http: httpx.Client, change: dict[str, Any], says: str
) -> None:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": ASK}]}]}
    for key, value in change.items():  # the SDK's Tool objects, as JSON
        body[key] = (
            [t.model_dump(mode="json", exclude_none=True) if hasattr(t, "model_dump") else t for t in value]
            if isinstance(value, list)
            else value
        )
    r = http.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body, headers=GEMINI_AUTH)
    assert r.status_code == 400
    assert_shape(load("gemini/error_503_unavailable.json"), r.json())
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT" and says in r.json()["error"]["message"]


def test_gemini_sdk_raises_the_refusal(gem: genai.Client) -> None:
    config = gemini_config(WEATHER, mode="ANY", allowed_function_names=["get_nothing"])
    with pytest.raises(genai_errors.ClientError) as caught:
        gem.models.generate_content(model="gemini-2.5-flash", contents=ASK, config=config)
    assert caught.value.code == 400 and "get_nothing" in str(caught.value)


# -- the error modes -----------------------------------------------------------------------------------


def faulty(http: httpx.Client, kind: str, rate: float = 1.0) -> str:
    """A model whose profile makes it err ``kind`` at ``rate``; its name."""
    model = f"err-{kind}"
    http.put("/admin/profile", json=profile(**{model: {kind: rate}})).raise_for_status()
    return model


def test_wrong_function_calls_another_declared_function_or_an_undeclared_one(
    oai: openai.OpenAI, http: httpx.Client
) -> None:
    model = faulty(http, "wrong_function")
    ask: Any = [{"role": "user", "content": ASK}]
    two = oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(WEATHER, TIME))
    (call,) = two.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"  # declared, and wrong for the weather
    assert set(json.loads(call.function.arguments)) == {"timezone", "hours"}
    one = oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(WEATHER))
    (call,) = one.choices[0].message.tool_calls or []
    assert call.function.name not in ("get_weather", "get_time")
    assert sim_stats(http)[model]["faults"] == {"tool_wrong_function": 2}


@pytest.mark.parametrize(
    ("kind", "fault"),
    [
        ("missing_argument", lambda args: "location" not in args),
        ("mistyped_argument", lambda args: not isinstance(args["location"], str)),
    ],
)
def test_argument_errors(oai: openai.OpenAI, http: httpx.Client, kind: str, fault: Any) -> None:
    model = faulty(http, kind)
    ask: Any = [{"role": "user", "content": ASK}]
    c = oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(WEATHER))
    (call,) = c.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and fault(json.loads(call.function.arguments))
    assert sim_stats(http)[model]["faults"] == {f"tool_{kind}": 1}


def test_malformed_json_on_every_wire(
    oai: openai.OpenAI, claude: anthropic.Anthropic, gem: genai.Client, http: httpx.Client
) -> None:
    model = faulty(http, "malformed_json")
    ask: Any = [{"role": "user", "content": ASK}]
    (call,) = (
        oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(WEATHER))
        .choices[0]
        .message.tool_calls
        or []
    )
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)
    # Claude's input is an object: the text the model wrote is kept in it, unparsed; a stream
    # carries it as input_json_delta fragments, which the SDK's accumulator refuses as it does
    # the SDK's own invalid-JSON fixture (tool_use_invalid_json.stream.sse).
    m = claude.messages.create(model=model, max_tokens=256, messages=ask, tools=claude_tools(WEATHER))
    use = m.content[-1]
    assert use.type == "tool_use" and set(use.input) == {"INVALID_JSON"}
    with (
        pytest.raises(ValueError, match="Unable to parse tool parameter JSON"),
        claude.messages.stream(model=model, max_tokens=256, messages=ask, tools=claude_tools(WEATHER)) as s,
    ):
        s.get_final_message()
    # Gemini parses the model's call itself and reports one it cannot parse.
    r = gem.models.generate_content(model=model, contents=ASK, config=gemini_config(WEATHER))
    assert r.candidates and r.candidates[0].finish_reason == genai_types.FinishReason.MALFORMED_FUNCTION_CALL
    assert not r.function_calls


def test_text_instead_of_call_even_when_a_call_is_required(oai: openai.OpenAI, http: httpx.Client) -> None:
    model = faulty(http, "text_instead_of_call")
    ask: Any = [{"role": "user", "content": ASK}]
    c = oai.chat.completions.create(
        model=model, messages=ask, tools=oai_tools(WEATHER), tool_choice="required"
    )
    assert c.choices[0].finish_reason == "stop" and not c.choices[0].message.tool_calls
    assert c.choices[0].message.content
    assert sim_stats(http)[model]["faults"] == {"tool_text_instead_of_call": 1}


def test_calls_and_faults_are_deterministic_by_seed(http: httpx.Client) -> None:
    model = "err-mixed"
    rates = {"wrong_function": 0.2, "missing_argument": 0.2, "mistyped_argument": 0.2, "malformed_json": 0.2}
    http.put("/admin/profile", json=profile(**{model: rates})).raise_for_status()

    def outcome(seed: int) -> tuple[str, str]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": ASK}],
            "tools": oai_tools(WEATHER, TIME),
        }
        r = http.post("/v1/chat/completions", json=body | {"seed": seed}, headers=OPENAI_AUTH).json()
        call = r["choices"][0]["message"]["tool_calls"][0]["function"]
        return call["name"], call["arguments"]

    first = [outcome(seed) for seed in range(16)]
    assert [outcome(seed) for seed in range(16)] == first  # the same seed, the same calls and faults
    assert len(set(first)) >= 3  # the seed decides which fault (if any) fires
    assert ("get_weather", '{"location":"Boston"}') in first  # and some requests are right


def test_a_llama_cpp_model_calls_tools_in_its_own_bodies(oai: openai.OpenAI, http: httpx.Client) -> None:
    fast = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)
    local = fast.model_copy(update={"server": "llama.cpp", "context_window": 4096})
    http.put("/admin/profile", json=SimProfile(default=fast, models={"smol": local}).model_dump(mode="json"))
    ask: Any = [{"role": "user", "content": ASK}]
    plain = oai.chat.completions.create(model="smol", messages=ask, tools=oai_tools(WEATHER))
    assert plain.choices[0].finish_reason == "tool_calls" and plain.system_fingerprint == "b0-simulator"
    (call,) = plain.choices[0].message.tool_calls or []
    with oai.chat.completions.stream(model="smol", messages=ask, tools=oai_tools(WEATHER)) as stream:
        streamed = stream.get_final_completion()
    (again,) = streamed.choices[0].message.tool_calls or []
    assert (again.function.name, again.function.arguments) == (call.function.name, '{"location":"Boston"}')


def test_strict_tools_keep_their_arguments_valid(oai: openai.OpenAI, http: httpx.Client) -> None:
    """Strict decoding holds arguments to the schema: an argument error cannot happen on a strict
    tool, whatever the model's rates; a wrong function still can."""
    strict_weather = {
        **WEATHER,
        "strict": True,
        "parameters": {
            **WEATHER["parameters"],
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
    }
    ask: Any = [{"role": "user", "content": ASK}]
    for kind in ("missing_argument", "mistyped_argument", "malformed_json"):
        model = faulty(http, kind)
        c = oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(strict_weather))
        (call,) = c.choices[0].message.tool_calls or []
        args = json.loads(call.function.arguments)
        assert set(args) == {"location", "unit"} and isinstance(args["location"], str), kind
        assert "faults" not in sim_stats(http)[model] or not sim_stats(http)[model]["faults"]
    model = faulty(http, "wrong_function")
    c = oai.chat.completions.create(model=model, messages=ask, tools=oai_tools(strict_weather))
    assert [k.function.name for k in c.choices[0].message.tool_calls or []] != ["get_weather"]
