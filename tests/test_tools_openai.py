"""Tool calling through the OpenAI adapter (``moa/providers/openai_client.py``), both ways.

The official ``openai`` SDK inside the adapter talks HTTP to the simulator, which speaks OpenAI's
tool calling (and llama.cpp's server, an OpenAI-compatible one); where a body no simulated model
sends is needed (OpenAI's published reference, a stream whose calls interleave, a compatible
server's quirks, llama-server's refusal), it is served verbatim from a loopback server, which also
records what the adapter sent, to hold it to OpenAI's reference request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from moa.config import resolve_endpoint
from moa.providers.client import ProviderClient
from moa.providers.registry import build_client
from moa.providers.transport import Attempt, ToolFragment
from moa.simulator.profile import ModelProfile, SimProfile
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
from tests.helpers import TOOL_TIME, TOOL_WEATHER, model_stats, set_fault, sim_requests, wait_idle
from tests.test_fidelity import FixtureServer, load, raw, serve, sse_events
from tests.test_providers import MODELS, provider_config

OPENAI, LOCAL = MODELS["openai"], MODELS["local"]
WEATHER = TOOL_WEATHER
TIME = TOOL_TIME
ASK = "What is the weather like in Boston today?"
BOTH = "Use get_weather for Boston and get_time for Europe in 3 hours."
BOSTON = '{"location":"Boston"}'
LONG_ASK = 'What is the weather like in "Boston, Massachusetts, United States of America" today?'
LONG_ARGS = '{"location":"Boston, Massachusetts, United States of America"}'
BOTH_CALLS = [("get_weather", BOSTON), ("get_time", '{"timezone":"Europe","hours":3}')]
FAST = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)


def ask(text: str = ASK, provider: str = "openai", **tools: Any) -> CallRequest:
    """A call offering WEATHER (or ``tools=``), with the rest of the ToolSet from ``tools``."""
    specs = tools.pop("tools", (WEATHER,))
    return CallRequest(
        provider=provider,
        model=MODELS[provider],
        messages=(ChatMessage(role="user", content=text),),
        tools=ToolSet(tools=specs, **tools),
    )


def named(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


async def streamed(client: ProviderClient, req: CallRequest) -> tuple[str, CallResult]:
    text, result = "", None
    async for ev in client.stream(req):
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            result = ev
    assert result is not None
    return text, result


async def both_ways(client: ProviderClient, req: CallRequest) -> list[CallResult]:
    """The call sent plain, then streamed; a streamed call's text is what its deltas carried."""
    plain = await client.complete(req)
    text, stream = await streamed(client, req)
    assert stream.text == text and stream.streamed
    return [plain, stream]


async def client_answer(client: ProviderClient, req: CallRequest) -> CallResult:
    res = await client.complete(req)
    assert res.ok, res.error
    return res


async def transport_items(client: ProviderClient, req: CallRequest) -> list[Any]:
    """What the adapter's stream yields, below the policy: text, ToolFragments, the Attempt."""
    return [item async for item in client.transport.open_stream(req, 5.0)]


@pytest.fixture
def profile(sim: SimulatorServer) -> Iterator[httpx.Client]:
    """The simulator fast, with the local provider's model played by a llama.cpp server."""
    local = FAST.model_copy(update={"server": "llama.cpp", "context_window": 4096})
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        body = SimProfile(default=FAST, models={LOCAL: local}).model_dump(mode="json")
        http.put("/admin/profile", json=body).raise_for_status()
        yield http


def client_at(provider: str, url: str, **overrides: Any) -> ProviderClient:
    cfg = provider_config(url, **overrides)
    return build_client(provider, cfg.providers[provider], resolve_endpoint(cfg, provider, sim_url=url))


@pytest.fixture
async def clients(sim: SimulatorServer, profile: httpx.Client) -> AsyncIterator[dict[str, ProviderClient]]:
    made = {p: client_at(p, sim.url) for p in ("openai", "local")}
    yield made
    for c in made.values():
        await c.aclose()


@pytest.fixture
async def fixture_clients(served: FixtureServer) -> AsyncIterator[dict[str, ProviderClient]]:
    # One attempt unless a test says otherwise: what a body is typed as is what the call reports.
    one = {"retry": {"max_attempts": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.01}}
    made = {p: client_at(p, served.url, **one) for p in ("openai", "local")}
    yield made
    for c in made.values():
        await c.aclose()


async def sim_answer(sim: SimulatorServer, body: dict[str, Any]) -> httpx.Response:
    """The simulator's own answer to an OpenAI request body (to replay it with changes)."""
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as http:
        r = await http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sim-key"})
    r.raise_for_status()
    return r


def chat_requests(served: FixtureServer) -> list[dict[str, Any]]:
    """The chat completion bodies the loopback server received (a compatible server's client
    also reads the model listing once)."""
    return [body for path, _, body in served.requests if path.endswith("/chat/completions")]


def sent(served: FixtureServer) -> dict[str, Any]:
    """The one request body the adapter sent the loopback server."""
    (body,) = chat_requests(served)
    return body


# -- the request, held to OpenAI's reference ------------------------------------------------------------

REFERENCE_TOOL = ToolSpec(**load("openai/chat_completion_tools.request.json")["tools"][0]["function"])
REFERENCE_ARGS = '{\n"location": "Boston, MA"\n}'  # as the reference response wrote them


def reference_request() -> CallRequest:
    ref = load("openai/chat_completion_tools.request.json")
    return CallRequest(
        provider="openai",
        model=ref["model"],
        messages=tuple(ChatMessage(**m) for m in ref["messages"]),
        tools=ToolSet(tools=(REFERENCE_TOOL,)),
    )


async def test_the_request_is_openais_reference_and_its_answer_is_read_as_written(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """The same question and tool as OpenAI's reference request give that very body (tools in
    ``{"type": "function", "function": ...}``, the choice ``auto``); the reference answer is one
    call, its id OpenAI's and its arguments exactly as the model wrote them (newlines kept)."""
    serve(served, raw("openai/chat_completion_tools.response.json"))
    res = await fixture_clients["openai"].complete(reference_request())
    assert sent(served) == load("openai/chat_completion_tools.request.json")
    assert res.ok and res.finish_reason == "tool_calls" and res.text == ""
    assert res.tool_calls == [
        ToolCall(id="call_abc123", name="get_current_weather", arguments=REFERENCE_ARGS)
    ]

    serve(served, raw("openai/chat_completion_tools.stream.sse"))
    text, res = await streamed(fixture_clients["openai"], reference_request())
    expected = load("openai/chat_completion_tools.stream.request.json")
    assert sent(served) == expected | {"stream_options": {"include_usage": True}}
    assert res.ok and res.finish_reason == "tool_calls" and text == res.text == ""
    arguments = '{"location":"Boston, MA"}'  # the reference stream's two fragments, joined
    assert res.tool_calls == [ToolCall(id="call_abc123", name="get_current_weather", arguments=arguments)]


async def test_choices_parallel_and_turns_are_sent_in_openais_shapes(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """Each choice in OpenAI's form (a named one as ``{"type": "function", ...}``);
    ``parallel_tool_calls: false`` only when parallel calls are off; an assistant turn's calls with
    content null when it said nothing else (its text otherwise), a tool turn by its call's id with
    no name (OpenAI's tool messages have none); a tool's optional fields only when set."""
    serve(served, raw("openai/chat_completion_tools.response.json"))
    client = fixture_clients["openai"]
    forms: list[tuple[ToolChoice, Any]] = [
        (ToolChoice(mode="auto"), "auto"),
        (ToolChoice(mode="none"), "none"),
        (ToolChoice(mode="required"), "required"),
        (
            ToolChoice(mode="function", name="get_time"),
            {"type": "function", "function": {"name": "get_time"}},
        ),
    ]
    for choice, form in forms:
        for parallel in (True, False):
            served.requests.clear()
            assert (await client.complete(ask(tools=(WEATHER, TIME), choice=choice, parallel=parallel))).ok
            body = sent(served)
            assert body["tool_choice"] == form
            assert body.get("parallel_tool_calls", "absent") == ("absent" if parallel else False)
    bare = ToolSpec(name="ping")
    strict = WEATHER.model_copy(update={"strict": True})
    served.requests.clear()
    assert (await client.complete(ask(tools=(bare, strict)))).ok
    assert sent(served)["tools"] == [
        {
            "type": "function",
            "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
        },
        {"type": "function", "function": WEATHER.model_dump(exclude_none=True) | {"strict": True}},
    ]

    call = ToolCall(id="call_1", name="get_weather", arguments=BOSTON)
    turns = (
        ChatMessage(role="user", content=ASK),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="18 degrees", tool_call_id="call_1", name="get_weather"),
        ChatMessage(role="assistant", content="Checking again.", tool_calls=(call,)),
        ChatMessage(role="tool", content="19 degrees", tool_call_id="call_1", name="get_weather"),
    )
    served.requests.clear()
    assert (await client.complete(ask().model_copy(update={"messages": turns}))).ok
    wire_call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": BOSTON}}
    assert sent(served)["messages"] == [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [wire_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "assistant", "content": "Checking again.", "tool_calls": [wire_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "19 degrees"},
    ]


async def test_a_turn_openai_cannot_carry_is_refused_before_anything_is_sent(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """A tool result that names no call, or a named choice without its name, cannot be written in
    OpenAI's API: refused as ours (internal, never the provider's fault), saying why, unsent."""
    serve(served, raw("openai/chat_completion_tools.response.json"))
    orphan = ask().model_copy(
        update={"messages": (ChatMessage(role="user", content=ASK), ChatMessage(role="tool", content="18"))}
    )
    unnamed = ask(choice=ToolChoice(mode="function"))
    for req, says in (
        (orphan, "messages[1]: a tool result without"),
        (unnamed, "without the function's name"),
    ):
        res = await fixture_clients["openai"].complete(req)
        assert res.error is not None and res.error.kind is ErrorKind.INTERNAL
        assert says in res.error.message
    assert chat_requests(served) == []


# -- against the simulator: calls, sent and streamed ----------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "local"])
async def test_a_call_comes_back_sent_and_streamed(
    clients: dict[str, ProviderClient], profile: httpx.Client, provider: str
) -> None:
    """OpenAI, and a llama.cpp server (in its own bodies): the call, with the server's id,
    finish ``tool_calls``, no text, and nothing of the call streamed as text."""
    for res in await both_ways(clients[provider], ask(provider=provider)):
        assert res.ok and res.finish_reason == "tool_calls" and res.text == ""
        assert named(res.tool_calls) == [("get_weather", BOSTON)]
        assert res.tool_calls[0].id.startswith("call_") and len(res.tool_calls[0].id) > 10
    # What the simulator read of the request: the tools, the choice, parallel calls allowed.
    offered = [r["tools"] for r in sim_requests(profile)[-2:]]
    assert offered == [{"names": ["get_weather"], "choice": "auto", "allowed": [], "parallel": True}] * 2


async def test_the_stream_yields_each_name_and_arguments_piece_as_a_tool_fragment(
    clients: dict[str, ProviderClient],
) -> None:
    """Below the policy, a streamed call is ToolFragments (its name, then each piece of its
    arguments: what is billed if the stream is cut) and the final Attempt with the whole call."""
    items = await transport_items(clients["openai"], ask())
    *fragments, final = items
    assert all(isinstance(f, ToolFragment) for f in fragments) and isinstance(final, Attempt)
    pieces = [f.text for f in fragments]
    assert pieces[0] == "get_weather" and "".join(pieces[1:]) == BOSTON and len(pieces) > 2
    assert named(final.tool_calls) == [("get_weather", BOSTON)] and final.finish_reason == "tool_calls"


async def test_parallel_calls_come_in_order_and_parallel_off_gives_one(
    clients: dict[str, ProviderClient], profile: httpx.Client
) -> None:
    for res in await both_ways(clients["openai"], ask(BOTH, tools=(WEATHER, TIME))):
        assert res.finish_reason == "tool_calls" and named(res.tool_calls) == BOTH_CALLS
        assert len({c.id for c in res.tool_calls}) == 2
    for res in await both_ways(clients["openai"], ask(BOTH, tools=(WEATHER, TIME), parallel=False)):
        assert named(res.tool_calls) == BOTH_CALLS[:1]
    assert sim_requests(profile)[-1]["tools"]["parallel"] is False


def call_index(data: Any) -> int | None:
    """The index of the call a stream chunk carries a fragment of (None: no fragment)."""
    if data == "[DONE]" or not data["choices"]:
        return None
    pieces = data["choices"][0]["delta"].get("tool_calls") or [{}]
    index: int | None = pieces[0].get("index")
    return index


async def test_interleaved_streamed_calls_are_assembled_by_index(
    sim: SimulatorServer,
    profile: httpx.Client,
    served: FixtureServer,
    fixture_clients: dict[str, ProviderClient],
) -> None:
    """Calls whose fragments interleave (each fragment says its call's ``index``) are each
    assembled whole, in index order: the simulator's stream of two calls, replayed with their
    fragments alternating, and with the second call's fragments first."""
    body = {
        "model": OPENAI,
        "messages": [{"role": "user", "content": BOTH}],
        "tools": [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in (WEATHER, TIME)],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await sim_answer(sim, body)
    blocks = [b + b"\n\n" for b in r.content.split(b"\n\n") if b.strip()]
    index = [call_index(data) for _, data in sse_events(r.content)]
    calls = [k for k, i in enumerate(index) if i is not None]
    head, tail = blocks[: calls[0]], blocks[calls[-1] + 1 :]
    first = [b for b, i in zip(blocks, index, strict=True) if i == 0]
    second = [b for b, i in zip(blocks, index, strict=True) if i == 1]
    assert len(first) > 2 and len(second) > 2 and len(first) + len(second) == len(calls)
    alternating = [b for pair in zip(first, second, strict=False) for b in pair]
    alternating += first[len(second) :] + second[len(first) :]
    for order in (alternating, second + first):
        serve(served, b"".join([*head, *order, *tail]))
        text, res = await streamed(fixture_clients["openai"], ask(BOTH, tools=(WEATHER, TIME)))
        assert res.ok and text == "" and named(res.tool_calls) == BOTH_CALLS


async def test_results_go_back_and_the_model_answers_from_them(clients: dict[str, ProviderClient]) -> None:
    """The agent loop: the call, its result as a tool turn, then a text answer that quotes it;
    on OpenAI and on a llama.cpp server, sent and streamed."""
    for provider in ("openai", "local"):
        first = await clients[provider].complete(ask(provider=provider))
        (call,) = first.tool_calls
        turns = (
            ChatMessage(role="user", content=ASK),
            ChatMessage(role="assistant", content=first.text, tool_calls=(call,)),
            ChatMessage(role="tool", content='{"temperature": 18}', tool_call_id=call.id, name=call.name),
        )
        follow_up = ask(provider=provider).model_copy(update={"messages": turns})
        for res in await both_ways(clients[provider], follow_up):
            assert res.ok and res.finish_reason == "stop" and res.tool_calls == []
            assert '[get_weather result] {"temperature": 18}' in res.text


async def test_choices_none_required_and_named_are_obeyed(clients: dict[str, ProviderClient]) -> None:
    client = clients["openai"]
    both = (WEATHER, TIME)
    for res in await both_ways(client, ask(BOTH, tools=both, choice=ToolChoice(mode="none"))):
        assert res.finish_reason == "stop" and res.text and res.tool_calls == []
    for res in await both_ways(client, ask(BOTH, tools=both, choice=ToolChoice(mode="required"))):
        assert named(res.tool_calls) == BOTH_CALLS
    named_time = ToolChoice(mode="function", name="get_time")
    for res in await both_ways(client, ask(BOTH, tools=both, choice=named_time)):
        assert named(res.tool_calls) == BOTH_CALLS[1:]
    # After a result, "auto" answers in text; "required" calls again.
    first = await client.complete(ask())
    turns = (
        ChatMessage(role="user", content=ASK),
        ChatMessage(role="assistant", content="", tool_calls=tuple(first.tool_calls)),
        ChatMessage(role="tool", content="18 degrees", tool_call_id=first.tool_calls[0].id),
    )
    again = ask(choice=ToolChoice(mode="required")).model_copy(update={"messages": turns})
    assert named((await client.complete(again)).tool_calls) == [("get_weather", BOSTON)]


async def test_a_stream_cut_mid_call_is_billed_for_the_fragments_received(
    sim: SimulatorServer, clients: dict[str, ProviderClient]
) -> None:
    """The connection drops halfway through a call's arguments: the call fails (never retried:
    the model had generated), billed for its prompt and for the name and arguments pieces that
    came, at least what the simulator invoices for it (it counts the arguments only)."""
    # Arguments long enough to stream in several pieces, the cut coming after some of them.
    (answer,) = (await client_answer(clients["openai"], ask(LONG_ASK))).tool_calls
    assert answer.arguments == LONG_ARGS
    set_fault(sim, OPENAI, cut_stream={"rate": 1.0})
    client = clients["openai"]
    got: list[str] = []
    with pytest.raises(Exception) as cut:  # the SDK's own; typed next
        async for item in client.transport.open_stream(ask(LONG_ASK), 5.0):
            assert isinstance(item, ToolFragment)
            got.append(item.text)
    assert client.transport.classify(cut.value, in_stream=True).kind is ErrorKind.MALFORMED_RESPONSE
    fragments = "".join(got)
    assert fragments.startswith("get_weather") and ("get_weather" + LONG_ARGS).startswith(fragments)
    assert len("get_weather") < len(fragments) < len("get_weather" + LONG_ARGS)
    await wait_idle(sim)
    before = model_stats(sim, OPENAI)

    text, res = await streamed(client, ask(LONG_ASK))
    assert res.error is not None and text == "" and res.attempts == 1 and res.usage_estimated
    assert res.usage.output_tokens == approx_tokens(fragments) > 0
    assert res.usage.input_tokens > 0 and res.cost_usd > 0
    await wait_idle(sim)
    billed = model_stats(sim, OPENAI)
    assert billed["billed_input_tokens"] > before["billed_input_tokens"]  # the prompt was read
    sim_output = billed["billed_output_tokens"] - before["billed_output_tokens"]
    assert res.usage.output_tokens >= sim_output > 0


# -- compatible servers: their quirks, and llama-server's refusal ---------------------------------------

REFERENCE_SSE = raw("openai/chat_completion_tools.stream.sse")


def rewrite_sse(edit: Any) -> bytes:
    """The reference stream with ``edit`` applied to each chunk's tool call fragments."""
    out = []
    for _, data in sse_events(REFERENCE_SSE):
        if data != "[DONE]":
            for choice in data["choices"]:
                for k, piece in enumerate(choice["delta"].get("tool_calls") or ()):
                    choice["delta"]["tool_calls"][k] = edit(piece)
        out.append(b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode())
    return b"\n\n".join(out) + b"\n\n"


async def test_compatible_servers_stream_quirks_are_read_as_one_call(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """A server repeating the id and name in every fragment (as DeepSeek and Qwen repeat the id),
    or sending fragments without an index, gives the reference's one call, named once."""
    repeat = {"id": "call_abc123", "type": "function"}

    def repeated(piece: dict[str, Any]) -> dict[str, Any]:
        return piece | repeat | {"function": piece["function"] | {"name": "get_current_weather"}}

    def unindexed(piece: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in piece.items() if k != "index"}

    expected = [ToolCall(id="call_abc123", name="get_current_weather", arguments='{"location":"Boston, MA"}')]
    for edit in (repeated, unindexed):
        serve(served, rewrite_sse(edit))
        items = await transport_items(fixture_clients["local"], reference_request())
        assert [i.text for i in items[:-1]] == ["get_current_weather", '{"location":', '"Boston, MA"}']
        assert items[-1].tool_calls == expected


async def test_a_legacy_function_call_answer_is_a_tool_call(
    sim: SimulatorServer,
    profile: httpx.Client,
    served: FixtureServer,
    fixture_clients: dict[str, ProviderClient],
) -> None:
    """A compatible server answering the legacy way (``message.function_call``, finish
    ``function_call``; streamed as ``delta.function_call``) gives one tool call, with an id made up
    in OpenAI's form since the legacy call has none: the simulator's legacy answers, replayed."""
    body = {
        "model": OPENAI,
        "messages": [{"role": "user", "content": ASK}],
        "functions": [WEATHER.model_dump()],
    }
    plain = await sim_answer(sim, body)
    stream = await sim_answer(sim, body | {"stream": True})
    assert plain.json()["choices"][0]["finish_reason"] == "function_call"
    for answer in (plain.content, stream.content):
        serve(served, answer)
        res = await fixture_clients["local"].complete(reference_request())
        if answer is stream.content:
            _, res = await streamed(fixture_clients["local"], reference_request())
        assert (
            res.ok
            and res.finish_reason == "tool_calls"
            and named(res.tool_calls) == [("get_weather", BOSTON)]
        )
        assert res.tool_calls[0].id.startswith("call_") and len(res.tool_calls[0].id) == 29


async def test_a_server_that_says_stop_after_calling_tools_finished_with_tool_calls(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """Some compatible servers end a turn of calls with ``stop``: the calls are what happened,
    so the finish is ours ``tool_calls``; a call cut short by the token limit keeps ``length``."""
    for said, ours in (("stop", "tool_calls"), ("length", "length")):
        body = load("openai/chat_completion_tools.response.json")
        body["choices"][0]["finish_reason"] = said
        serve(served, json.dumps(body).encode())
        res = await fixture_clients["local"].complete(reference_request())
        assert res.ok and res.finish_reason == ours and len(res.tool_calls) == 1


async def test_a_finish_naming_calls_that_never_came_is_malformed(
    served: FixtureServer, fixture_clients: dict[str, ProviderClient]
) -> None:
    """``finish_reason: tool_calls`` with no call, or a streamed call never named: a malformed
    answer, typed so, never an empty success."""
    body = load("openai/chat_completion_tools.response.json")
    del body["choices"][0]["message"]["tool_calls"]
    serve(served, json.dumps(body).encode())
    res = await fixture_clients["openai"].complete(reference_request())
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert "without any tool call" in res.error.message

    def nameless(piece: dict[str, Any]) -> dict[str, Any]:
        return piece | {"function": {k: v for k, v in piece["function"].items() if k != "name"}}

    serve(served, rewrite_sse(nameless))
    _, res = await streamed(fixture_clients["openai"], reference_request())
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert "never named its function" in res.error.message


# How llama-server refuses tools, with a 500 in its own error body, each message the server's
# (``oaicompat_chat_params_parse``: throw std::runtime_error(...)), its handler answering such an
# exception with 500 and type server_error, as public issue threads quote it
# (containers/ramalama#988): without jinja templates ("--no-jinja"; on by default since llama.cpp's
# PR #17524, the server the simulator plays, which answers tools), and, in builds from before
# streamed tool calls, a stream offering tools.
LLAMA_REFUSALS = [
    b'{"error":{"code":500,"message":"tools param requires --jinja flag","type":"server_error"}}',
    b'{"error":{"code":500,"message":"Cannot use tools with stream","type":"server_error"}}',
]


@pytest.mark.parametrize("refusal", LLAMA_REFUSALS, ids=["no-jinja", "no-stream"])
async def test_a_server_refusing_tools_is_a_bad_request_not_a_fault(
    served: FixtureServer, refusal: bytes
) -> None:
    """llama-server refusing tools with a 500 is typed as the refusal it is (bad request, its
    status kept, its message quoted): neither retried nor held against the server's health. A
    real 500 is still a server error, retried."""
    client = client_at("local", served.url)  # three attempts: a server error would be retried
    message = json.loads(refusal)["error"]["message"]
    try:
        for stream in (False, True):
            serve(served, refusal, 500)
            if stream:
                _, res = await streamed(client, ask(provider="local"))
            else:
                res = await client.complete(ask(provider="local"))
            assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST and res.attempts == 1
            assert res.error.status_code == 500 and message in res.error.message
            assert len(chat_requests(served)) == 1
        serve(served, refusal.replace(message.encode(), b"oops"), 500)
        res = await client.complete(ask(provider="local"))
        assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR and res.attempts == 3
    finally:
        await client.aclose()
