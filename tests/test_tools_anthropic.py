"""The Anthropic adapter's tool calling, both ways, streamed and not.

Two doubles, both over HTTP through the official ``anthropic`` SDK, as production talks to the API:

- a loopback server answering with Anthropic's published bodies (tests/fixtures/providers/
  anthropic), which records what the adapter sent: the request's body is held to the published
  tool-use and tool-result requests field for field, and the published answers (a call, a
  streamed call, a streamed call with invalid JSON) come back as our ``ToolCall``s;
- the provider simulator, whose simulated model calls the declared tools: calls plain and
  streamed, parallel calls, each tool choice, the results of the calls sent back (the model then
  answers from them), and a stream cut in the middle of a call.

Requests we cannot send as the API takes them (arguments that are not a JSON object, a result
after a user's text) are refused before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from moa.config import MoAConfig
from moa.providers.client import ProviderClient
from moa.providers.registry import ProviderPool
from moa.simulator.profile import ModelProfile, SimProfile, ToolErrors
from moa.simulator.server import SimulatorServer
from moa.tokens import approx_tokens
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    ErrorKind,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolSet,
    ToolSpec,
)
from tests.helpers import (
    TOOL_TIME,
    TOOL_WEATHER,
    model_stats,
    set_fault,
    sim_requests,
    sim_total_requests,
    wait_idle,
)
from tests.test_fidelity import FixtureServer, client_for, load, raw, serve
from tests.test_providers import collect, provider_config

MODEL = "claude-haiku-4-5"

# The published examples' tool (tool_use.request.json, tool_result.request.json).
REFERENCE_TOOL = load("anthropic/tool_use.request.json")["tools"][0]
SF_TOOL = ToolSpec(
    name=REFERENCE_TOOL["name"],
    description=REFERENCE_TOOL["description"],
    parameters=REFERENCE_TOOL["input_schema"],
)
SF_ASK = ChatMessage(role="user", content="What is the weather like in San Francisco?")

WEATHER = TOOL_WEATHER
TIME = TOOL_TIME
ASK = ChatMessage(role="user", content="What is the weather like in Boston today?")
BOTH = ChatMessage(role="user", content="Use get_weather for Boston and get_time for Europe in 3 hours.")


def tools(*specs: ToolSpec, mode: str = "auto", name: str | None = None, parallel: bool = True) -> ToolSet:
    return ToolSet(tools=specs, choice=ToolChoice(mode=mode, name=name), parallel=parallel)  # type: ignore[arg-type]


def request(*messages: ChatMessage, toolset: ToolSet | None, model: str = MODEL) -> CallRequest:
    return CallRequest(provider="anthropic", model=model, messages=messages, tools=toolset)


async def run(client: ProviderClient, req: CallRequest, stream: bool) -> tuple[str, CallResult]:
    """The call's text as a client sees it (the deltas, streamed) and its result."""
    if stream:
        return await collect(client.stream(req))
    res = await client.complete(req)
    return res.text, res


def calls(res: CallResult) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in res.tool_calls]


# -- the published bodies, both ways ---------------------------------------------------------------


@pytest.fixture
async def reference(served: FixtureServer) -> AsyncIterator[ProviderClient]:
    client = client_for("anthropic", served.url)
    yield client
    await client.aclose()


def sse(name: str) -> bytes:
    """A published stream as a server sends it: the SDK's fixtures are verbatim files that end
    without the blank line closing their last event, which an SSE reader needs to dispatch it."""
    return raw(name).rstrip(b"\n") + b"\n\n"


def sent_body(served: FixtureServer) -> Any:
    ((path, _, body),) = served.requests
    assert path == "/v1/messages"
    return body


async def test_tools_are_sent_as_the_published_tool_use_request(
    served: FixtureServer, reference: ProviderClient
) -> None:
    serve(served, raw("anthropic/tool_use.response.json"))
    req = request(SF_ASK, toolset=tools(SF_TOOL), model="claude-opus-4-6")
    res = await reference.complete(req)
    # Field for field: the default choice (auto, parallel calls allowed) is the API's default,
    # so no tool_choice goes.
    assert sent_body(served) == load("anthropic/tool_use.request.json")
    # The published answer: its text stays text, its tool_use block is our call, its input the
    # arguments' JSON text.
    assert res.ok, res.error
    assert res.finish_reason == "tool_calls"
    assert res.text == "I'll check the current weather in San Francisco for you."
    assert res.tool_calls == [
        ToolCall(
            id="toolu_01A09q90qw90lq917835lq9",
            name="get_weather",
            arguments='{"location": "San Francisco, CA", "unit": "celsius"}',
        )
    ]


async def test_a_call_and_its_result_are_sent_as_the_published_tool_result_request(
    served: FixtureServer, reference: ProviderClient
) -> None:
    serve(served, raw("anthropic/message.response.json"))
    call = ToolCall(
        id="toolu_01A09q90qw90lq917835lq9",
        name="get_weather",
        arguments='{"location": "San Francisco, CA", "unit": "celsius"}',
    )
    messages = (
        SF_ASK,
        ChatMessage(
            role="assistant",
            content="I'll check the current weather in San Francisco for you.",
            tool_calls=(call,),
        ),
        ChatMessage(role="tool", content="15 degrees", tool_call_id=call.id, name="get_weather"),
    )
    res = await reference.complete(request(*messages, toolset=tools(SF_TOOL), model="claude-opus-4-6"))
    assert res.ok, res.error
    assert sent_body(served) == load("anthropic/tool_result.request.json")


async def test_results_and_text_after_them_go_in_one_user_turn_and_text_turns_still_merge(
    served: FixtureServer, reference: ProviderClient
) -> None:
    serve(served, raw("anthropic/message.response.json"))
    a = ToolCall(id="toolu_a", name="get_weather", arguments='{"location": "Oslo"}')
    b = ToolCall(id="toolu_b", name="get_time", arguments="{}")
    messages = (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(role="user", content="And the time?"),
        ChatMessage(role="assistant", content="", tool_calls=(a, b)),
        ChatMessage(role="tool", content='{"temperature": 4}', tool_call_id="toolu_a", name="get_weather"),
        ChatMessage(role="tool", content="noon", tool_call_id="toolu_b", name="get_time"),
        ChatMessage(role="user", content="Thanks."),
    )
    res = await reference.complete(request(*messages, toolset=tools(WEATHER, TIME)))
    assert res.ok, res.error
    body = sent_body(served)
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Oslo?\n\nAnd the time?"},
        {
            "role": "assistant",
            "content": [  # no empty text block before the calls
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"location": "Oslo"}},
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"temperature": 4}'},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "noon"},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("toolset", "choice"),
    [
        (tools(WEATHER, TIME, mode="none"), {"type": "none"}),
        (tools(WEATHER, TIME, mode="required"), {"type": "any"}),
        (tools(WEATHER, TIME, mode="function", name="get_time"), {"type": "tool", "name": "get_time"}),
        (tools(WEATHER, TIME, parallel=False), {"type": "auto", "disable_parallel_tool_use": True}),
        (
            tools(WEATHER, TIME, mode="required", parallel=False),
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        # No call can come under none: the flag has no place there (the API's none takes none).
        (tools(WEATHER, TIME, mode="none", parallel=False), {"type": "none"}),
    ],
)
async def test_each_choice_is_sent_as_the_apis_tool_choice(
    served: FixtureServer, reference: ProviderClient, toolset: ToolSet, choice: dict[str, Any]
) -> None:
    serve(served, raw("anthropic/message.response.json"))
    res = await reference.complete(request(ASK, toolset=toolset))
    assert res.ok, res.error
    body = sent_body(served)
    assert body["tool_choice"] == choice
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]


async def test_a_strict_tool_is_sent_strict(served: FixtureServer, reference: ProviderClient) -> None:
    serve(served, raw("anthropic/message.response.json"))
    strict = WEATHER.model_copy(update={"strict": True, "description": None})
    await reference.complete(request(ASK, toolset=tools(strict)))
    (tool,) = sent_body(served)["tools"]
    assert tool == {"name": "get_weather", "input_schema": WEATHER.parameters, "strict": True}


async def test_the_published_tool_use_stream_is_assembled_from_its_fragments(
    served: FixtureServer, reference: ProviderClient
) -> None:
    serve(served, sse("anthropic/tool_use.stream.sse"))
    text, res = await collect(reference.stream(request(SF_ASK, toolset=tools(SF_TOOL))))
    assert res.ok, res.error
    # The call's pieces are never shown as text; the arguments are its fragments joined.
    assert text == res.text == "I'll check the current weather in Paris for you."
    assert res.finish_reason == "tool_calls"
    assert res.tool_calls == [
        ToolCall(id="toolu_01NRLabsLyVHZPKxbKvkfSMn", name="get_weather", arguments='{"location": "Paris"}')
    ]


async def test_invalid_json_in_a_stream_is_kept_as_the_model_wrote_it(
    served: FixtureServer, reference: ProviderClient
) -> None:
    serve(served, sse("anthropic/tool_use_invalid_json.stream.sse"))
    _, res = await collect(reference.stream(request(SF_ASK, toolset=tools(SF_TOOL))))
    assert res.ok, res.error
    (call,) = res.tool_calls
    assert call.arguments == '{"location": "Paris", "unit": celsius}'  # not repaired


async def test_a_streamed_call_without_arguments_takes_an_empty_object(
    served: FixtureServer, reference: ProviderClient
) -> None:
    # The published stream with the call's fragments taken out but the first, empty one: a call
    # of a function that takes no arguments.
    events = sse("anthropic/tool_use.stream.sse").split(b"\n\n")
    events = [e for e in events if b'"partial_json":"' not in e or b'"partial_json":""' in e]
    serve(served, b"\n\n".join(events))
    _, res = await collect(reference.stream(request(SF_ASK, toolset=tools(SF_TOOL))))
    assert res.ok, res.error
    assert [(c.name, c.arguments) for c in res.tool_calls] == [("get_weather", "{}")]


async def test_an_empty_user_message_after_results_adds_no_empty_text_block(
    served: FixtureServer, reference: ProviderClient
) -> None:
    # The API refuses an empty text block beside others; an empty message says nothing to keep.
    serve(served, raw("anthropic/message.response.json"))
    call = ToolCall(id="toolu_a", name="get_weather", arguments='{"location": "Oslo"}')
    messages = (
        ASK,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="4 degrees", tool_call_id="toolu_a", name="get_weather"),
        ChatMessage(role="user", content=""),
    )
    res = await reference.complete(request(*messages, toolset=tools(WEATHER)))
    assert res.ok, res.error
    assert sent_body(served)["messages"][-1] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_a", "content": "4 degrees"}],
    }


async def test_a_tool_use_stop_without_a_call_is_malformed(
    served: FixtureServer, reference: ProviderClient
) -> None:
    body = load("anthropic/message.response.json") | {"stop_reason": "tool_use"}
    serve(served, json.dumps(body).encode())
    res = await reference.complete(request(SF_ASK, toolset=tools(SF_TOOL)))
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert "tool_use" in res.error.message


async def test_input_fragments_for_a_block_that_is_no_call_are_malformed(
    served: FixtureServer, reference: ProviderClient
) -> None:
    # The published stream with its call's opening event taken out: fragments for block 1 come
    # without any tool_use block to belong to.
    events = sse("anthropic/tool_use.stream.sse").split(b"\n\n")
    events = [e for e in events if b'"content_block":{"type":"tool_use"' not in e]
    serve(served, b"\n\n".join(events))
    _, res = await collect(reference.stream(request(SF_ASK, toolset=tools(SF_TOOL))))
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert "block 1" in res.error.message


# -- the simulator: a model that calls the tools -------------------------------------------------------


@pytest.fixture
async def anthropic_client(sim: SimulatorServer) -> AsyncIterator[ProviderClient]:
    async with ProviderPool.from_config(provider_config(sim.url), sim_url=sim.url) as pool:
        yield pool.clients["anthropic"]


def offered(sim: SimulatorServer) -> Any:
    """What the last request offered, as the simulator parsed it."""
    return sim_requests(sim)[-1]["tools"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_comes_back_as_a_tool_call(
    anthropic_client: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    text, res = await run(anthropic_client, request(ASK, toolset=tools(WEATHER)), stream)
    assert res.ok, res.error
    assert res.finish_reason == "tool_calls" and res.streamed is stream
    assert calls(res) == [("get_weather", {"location": "Boston"})]
    assert res.tool_calls[0].id.startswith("toolu_01")
    # Under auto Claude writes a line first; it is the only text (no piece of the call in it).
    assert text == res.text and res.text and "Boston" not in res.text
    assert offered(sim) == {"names": ["get_weather"], "choice": "auto", "allowed": [], "parallel": True}


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_calls_come_back_in_order_and_one_when_parallel_is_off(
    anthropic_client: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    _, res = await run(anthropic_client, request(BOTH, toolset=tools(WEATHER, TIME)), stream)
    assert res.ok, res.error
    assert calls(res) == [
        ("get_weather", {"location": "Boston"}),
        ("get_time", {"timezone": "Europe", "hours": 3}),
    ]
    assert len({c.id for c in res.tool_calls}) == 2
    _, one = await run(anthropic_client, request(BOTH, toolset=tools(WEATHER, TIME, parallel=False)), stream)
    assert one.finish_reason == "tool_calls" and calls(one) == [("get_weather", {"location": "Boston"})]
    assert offered(sim)["parallel"] is False


@pytest.mark.parametrize("stream", [False, True])
async def test_each_tool_choice_is_followed(
    anthropic_client: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    _, none = await run(anthropic_client, request(BOTH, toolset=tools(WEATHER, TIME, mode="none")), stream)
    assert none.ok and none.finish_reason == "stop" and none.text and none.tool_calls == []
    assert offered(sim)["choice"] == "none"

    _, required = await run(
        anthropic_client, request(BOTH, toolset=tools(WEATHER, TIME, mode="required")), stream
    )
    # Under any the API prefills the call: no text before it.
    assert required.finish_reason == "tool_calls" and required.text == ""
    assert [c.name for c in required.tool_calls] == ["get_weather", "get_time"]
    assert offered(sim)["choice"] == "required"

    named = tools(WEATHER, TIME, mode="function", name="get_time")
    _, one = await run(anthropic_client, request(BOTH, toolset=named), stream)
    assert one.finish_reason == "tool_calls" and [c.name for c in one.tool_calls] == ["get_time"]
    assert offered(sim)["allowed"] == ["get_time"]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_results_go_back_and_the_model_answers_from_them(
    anthropic_client: ProviderClient, stream: bool
) -> None:
    toolset = tools(WEATHER, TIME)
    _, first = await run(anthropic_client, request(BOTH, toolset=toolset), stream)
    assert len(first.tool_calls) == 2
    results = {"get_weather": '{"temperature": "18 degrees"}', "get_time": "half past nine"}
    messages = (
        BOTH,
        ChatMessage(role="assistant", content=first.text, tool_calls=tuple(first.tool_calls)),
        *(
            ChatMessage(role="tool", content=results[c.name], tool_call_id=c.id, name=c.name)
            for c in first.tool_calls
        ),
    )
    # Both results must reach the model in the one user turn after the calls: the API (and the
    # simulator) refuse a call left without its result in the very next message.
    text, final = await run(anthropic_client, request(*messages, toolset=toolset), stream)
    assert final.ok, final.error
    assert final.finish_reason == "stop" and final.tool_calls == []
    assert text == final.text and "18 degrees" in final.text and "half past nine" in final.text
    # A user's text after the results joins their turn, after them: the API takes it (the model,
    # asked something new, may call again).
    after = (*messages, ChatMessage(role="user", content="Please answer in one line."))
    _, also = await run(anthropic_client, request(*after, toolset=toolset), stream)
    assert also.ok, also.error


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_arguments_come_back_as_the_model_wrote_them(
    anthropic_client: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    """The simulated model writes arguments that are not JSON: streamed, as fragments; plain,
    wrapped in ``{"INVALID_JSON": ...}``. Both ways the call carries the text it wrote."""
    model = "claude-err-malformed-json"
    fast = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)
    profile = SimProfile(
        default=fast, models={model: fast.model_copy(update={"tool_errors": ToolErrors(malformed_json=1.0)})}
    )
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        (await admin.put("/admin/profile", json=profile.model_dump(mode="json"))).raise_for_status()
    _, res = await run(anthropic_client, request(ASK, toolset=tools(WEATHER), model=model), stream)
    assert res.ok, res.error
    (call,) = res.tool_calls
    assert call.name == "get_weather" and "Boston" in call.arguments
    assert "INVALID_JSON" not in call.arguments
    with pytest.raises(ValueError):
        json.loads(call.arguments)


async def test_a_stream_cut_in_a_call_is_billed_for_the_pieces_it_sent(
    sim: SimulatorServer, config: MoAConfig
) -> None:
    """The connection drops half way through the call's fragments: nothing was shown, but the
    call was generated, so the failed call is billed its prompt and the pieces received, as the
    simulator invoices it (our count also has the function's name, which its invoice leaves out),
    and it is not sent again."""
    set_fault(sim, MODEL, cut_stream={"rate": 1.0})
    # A long argument, so that half the fragments is a good many tokens.
    ask = ChatMessage(role="user", content='get_weather for "' + "Llanfairpwllgwyngyll " * 8 + '"')
    req = request(ask, toolset=tools(WEATHER, mode="required"))
    text, res = "", None
    async with ProviderPool.from_config(config, sim_url=sim.url) as pool:
        async for ev in pool.stream(req):
            if isinstance(ev, TextDelta):
                text += ev.text
            else:
                res = ev
    assert res is not None and res.error is not None and res.attempts == 1
    assert text == "" and res.tool_calls == []
    await wait_idle(sim)
    billed = model_stats(sim, MODEL)
    assert billed["billed_output_tokens"] > 5
    # The prompt is the policy's estimate (messages and tool definitions), not this adapter's.
    assert res.usage_estimated and res.usage.input_tokens > 0 and billed["billed_input_tokens"] > 0
    name = approx_tokens("get_weather")
    assert billed["billed_output_tokens"] <= res.usage.output_tokens <= billed["billed_output_tokens"] + name
    assert res.cost_usd > 0


# -- refused before sending ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    ['["Boston"]', "location=Boston", '{"location": NaN}', ""],
    ids=["array", "not-json", "nan", "empty"],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_arguments_that_are_not_a_json_object_are_refused_naming_the_call(
    anthropic_client: ProviderClient, sim: SimulatorServer, arguments: str, stream: bool
) -> None:
    call = ToolCall(id="toolu_bad", name="get_weather", arguments=arguments)
    messages = (
        ASK,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="18 degrees", tool_call_id="toolu_bad", name="get_weather"),
    )
    _, res = await run(anthropic_client, request(*messages, toolset=tools(WEATHER)), stream)
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert "toolu_bad" in res.error.message and "get_weather" in res.error.message
    assert res.attempts == 1 and sim_total_requests(sim) == 0
    # Nothing left this side, so nothing is billed: no prompt was read.
    assert res.usage.total_tokens == 0 and res.cost_usd == 0 and not res.usage_estimated


async def test_a_result_after_a_users_text_is_refused(
    anthropic_client: ProviderClient, sim: SimulatorServer
) -> None:
    call = ToolCall(id="toolu_1", name="get_weather", arguments='{"location": "Boston"}')
    messages = (
        ASK,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="user", content="Any news?"),
        ChatMessage(role="tool", content="18 degrees", tool_call_id="toolu_1", name="get_weather"),
    )
    res = await anthropic_client.complete(request(*messages, toolset=tools(WEATHER)))
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert "toolu_1" in res.error.message
    assert sim_total_requests(sim) == 0


async def test_a_tool_message_without_its_call_id_is_refused(
    anthropic_client: ProviderClient, sim: SimulatorServer
) -> None:
    call = ToolCall(id="toolu_1", name="get_weather", arguments='{"location": "Boston"}')
    messages = (
        ASK,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="18 degrees", name="get_weather"),
    )
    res = await anthropic_client.complete(request(*messages, toolset=tools(WEATHER)))
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert "tool_call_id" in res.error.message
    assert sim_total_requests(sim) == 0
