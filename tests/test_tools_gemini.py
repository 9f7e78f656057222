"""The Gemini adapter's tool calling (``moa.providers.gemini_client``), both ways, streaming included.

The real adapter (the official ``google-genai`` SDK inside, behind the provider policy) against:

- the simulator over HTTP: calls come back as ``ToolCall``s, plain and streamed, one or several;
  a conversation carrying them and their results round-trips to a text answer, on a model that
  numbers its calls (Gemini 3) and on one that does not (2.5, ids made up here); every tool choice
  reaches the API as the mode that means it; a stream cut after a call is billed for it;
- a loopback server answering with the providers' reference bodies (tests/fixtures/providers/gemini),
  which records what the adapter sent: the request bodies must be the reference requests, and the
  reference answers must be read right;
- requests Gemini cannot take: refused before anything is sent, naming the tool or call.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from moa.config import MoAConfig, parse_config, resolve_endpoint
from moa.providers.client import ProviderClient
from moa.providers.registry import build_client
from moa.simulator.server import SimulatorServer
from moa.tokens import approx_tokens
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    ErrorKind,
    ToolCall,
    ToolChoice,
    ToolSet,
    ToolSpec,
)
from tests.helpers import TOOL_TIME, model_stats, set_fault, sim_requests, wait_idle
from tests.test_fidelity import FixtureServer, load, raw, serve
from tests.test_providers import collect
from tests.test_simulator_tools import profile

FLASH = "gemini-2.5-flash"  # gives its calls no id: the adapter makes them up
PRO3 = "gemini-3-pro-preview"  # numbers every call, and expects the number back
MADE_UP = re.compile(r"^call_[0-9a-f]{32}$")

WEATHER = ToolSpec(
    name="get_weather",
    description="Get the current weather in a given location",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
        "additionalProperties": False,  # JSON Schema that Gemini's `parameters` field refuses
    },
)
TIME = TOOL_TIME
ASK = "What is the weather like in Boston today?"
THREE = 'What is the weather in "Paris", "Oslo" and "Rome"?'


def config(url: str) -> MoAConfig:
    """One Gemini provider (both kinds of model) at ``url``: one attempt, so a refusal is final."""
    prices = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}
    return parse_config(
        {
            "providers": {
                "gemini": {
                    "kind": "gemini",
                    "api_key_env": "GEMINI_API_KEY",
                    "timeout_s": 5,
                    "retry": {"max_attempts": 1},
                    "models": {FLASH: prices, PRO3: prices},
                }
            },
            "simulator": {"mode": "on", "url": url},
        }
    )


def client_at(url: str) -> ProviderClient:
    cfg = config(url)
    return build_client("gemini", cfg.providers["gemini"], resolve_endpoint(cfg, "gemini", sim_url=url))


@pytest.fixture
async def gemini(sim: SimulatorServer) -> AsyncIterator[ProviderClient]:
    client = client_at(sim.url)
    yield client
    await client.aclose()


@pytest.fixture
async def recorded(served: FixtureServer) -> AsyncIterator[ProviderClient]:
    """The adapter pointed at the loopback server that records its requests."""
    client = client_at(served.url)
    yield client
    await client.aclose()


def ask(
    *messages: ChatMessage, model: str = FLASH, tools: tuple[ToolSpec, ...] = (WEATHER,), **toolset: Any
) -> CallRequest:
    return CallRequest(
        provider="gemini", model=model, messages=messages, tools=ToolSet(tools=tools, **toolset)
    )


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


async def call(client: ProviderClient, req: CallRequest, stream: bool) -> CallResult:
    if not stream:
        return await client.complete(req)
    text, res = await collect(client.stream(req))
    assert text == res.text  # tool call fragments are never passed on as text
    return res


def args(c: ToolCall) -> Any:
    return json.loads(c.arguments)


# -- against the simulator ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", [FLASH, PRO3])
async def test_a_call_comes_back_as_a_tool_call(
    gemini: ProviderClient, sim: SimulatorServer, model: str, stream: bool
) -> None:
    res = await call(gemini, ask(user(ASK), model=model), stream)
    assert res.ok, res.error
    assert res.finish_reason == "tool_calls" and res.text == ""
    (c,) = res.tool_calls
    assert c.name == "get_weather" and args(c) == {"location": "Boston"}
    # Compact JSON text, as the model writes it (and as a cut stream is billed for it).
    assert c.arguments == '{"location":"Boston"}'
    # Gemini 3's own id is kept; 2.5 gives none, so one is made up.
    assert bool(MADE_UP.match(c.id)) is (model == FLASH) and c.id
    seen = sim_requests(sim)[-1]
    assert seen["tools"] == {"names": ["get_weather"], "choice": "auto", "allowed": [], "parallel": True}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_parallel_calls_each_get_their_own_id_and_all_are_kept(
    gemini: ProviderClient, stream: bool
) -> None:
    """Three calls at once, in the model's order, each with a made-up id of its own. With
    ``parallel=False`` too: Gemini has no switch for it, and no call the model made is dropped."""
    for parallel in (True, False):
        res = await call(gemini, ask(user(THREE), parallel=parallel), stream)
        assert res.ok and res.finish_reason == "tool_calls", res.error
        assert [args(c) for c in res.tool_calls] == [{"location": x} for x in ("Paris", "Oslo", "Rome")]
        ids = [c.id for c in res.tool_calls]
        assert all(MADE_UP.match(i) for i in ids) and len(set(ids)) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", [FLASH, PRO3])
async def test_calls_and_their_results_round_trip_to_a_text_answer(
    gemini: ProviderClient, model: str, stream: bool
) -> None:
    """The calls go back as the model's turn and the results (one JSON object, one plain text) as
    one turn of function responses: the simulator refuses a results turn that answers fewer calls
    than the call turn made, or (Gemini 3) a response whose id is not its call's."""
    first = await call(gemini, ask(user(THREE), model=model), stream)
    assert first.ok and len(first.tool_calls) == 3, first.error
    paris, oslo, rome = first.tool_calls
    conversation = (
        user(THREE),
        ChatMessage(role="assistant", content="", tool_calls=tuple(first.tool_calls)),
        ChatMessage(role="tool", tool_call_id=paris.id, name=paris.name, content='{"temp_c": 21}'),
        # No name on the message: the function it answers is the one its call called.
        ChatMessage(role="tool", tool_call_id=oslo.id, content="Rain, 9 C"),
        ChatMessage(role="tool", tool_call_id=rome.id, name=rome.name, content="[1, 2]"),
    )
    answer = await call(gemini, ask(*conversation, model=model), stream)
    assert answer.ok, answer.error
    assert answer.finish_reason == "stop" and not answer.tool_calls
    # The simulated model answers from the results, quoting each as the API passed it on: an
    # object as it is, anything else as {"output": <the text>}.
    assert answer.text.startswith(
        'From the tool results ([get_weather result] {"temp_c": 21}; '
        '[get_weather result] {"output": "Rain, 9 C"}; [get_weather result] {"output": "[1, 2]"}): '
    ), answer.text
    # A new question after the answer: the model calls again, ids made afresh.
    again = await call(
        gemini,
        ask(*conversation, ChatMessage(role="assistant", content=answer.text), user(ASK), model=model),
        stream,
    )
    assert [c.name for c in again.tool_calls] == ["get_weather"], again.error
    assert again.tool_calls[0].id not in {c.id for c in first.tool_calls}


async def test_a_wrong_id_on_a_gemini_3_result_is_refused_by_the_api(gemini: ProviderClient) -> None:
    """The ids Gemini 3 gave are sent back as they are: one the call did not have is the API's 400,
    proof that the adapter passes ids on rather than leaving them out."""
    first = await gemini.complete(ask(user(ASK), model=PRO3))
    (c,) = first.tool_calls
    wrong = ChatMessage(role="tool", tool_call_id="zzzzzzzz", name=c.name, content="{}")
    res = await gemini.complete(
        ask(user(ASK), ChatMessage(role="assistant", content="", tool_calls=(c,)), wrong, model=PRO3)
    )
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert "functionResponse.id does not match functionCall.id" in res.error.message


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_each_tool_choice_is_the_mode_that_means_it(
    gemini: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    both = (WEATHER, TIME)
    after_result = (
        user(ASK),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(
                ToolCall(id="call_" + "0" * 32, name="get_weather", arguments='{"location":"Boston"}'),
            ),
        ),
        ChatMessage(
            role="tool", tool_call_id="call_" + "0" * 32, name="get_weather", content='{"temp_c": 3}'
        ),
    )

    async def made(messages: tuple[ChatMessage, ...], choice: ToolChoice) -> list[str]:
        res = await call(gemini, ask(*messages, tools=both, choice=choice), stream)
        assert res.ok, res.error
        assert (res.finish_reason == "tool_calls") is bool(res.tool_calls)
        return [c.name for c in res.tool_calls]

    def sent() -> tuple[str, list[str]]:
        seen = sim_requests(sim)[-1]["tools"]
        return seen["choice"], seen["allowed"]

    assert await made((user(ASK),), ToolChoice(mode="none")) == [] and sent() == ("none", [])
    # After a result, auto answers in text; required (ANY) must call again.
    assert await made(after_result, ToolChoice(mode="auto")) == [] and sent() == ("auto", [])
    assert await made(after_result, ToolChoice(mode="required")) == ["get_weather"]
    assert sent() == ("required", [])
    # A named function: ANY, allowed to call that one only (the question is about the weather).
    assert await made((user(ASK),), ToolChoice(mode="function", name="get_time")) == ["get_time"]
    assert sent() == ("required", ["get_time"])


async def test_a_stream_cut_after_a_call_is_billed_for_the_call(
    gemini: ProviderClient, sim: SimulatorServer
) -> None:
    """The model's call arrives, then the stream stalls until the deadline: the call was generated
    and sent, so the failure is billed for it (its name and arguments), exactly as the provider
    bills it, although no text reached the caller."""
    set_fault(sim, FLASH, stall={"rate": 1.0, "after_tokens": 1})
    req = ask(user(ASK)).model_copy(update={"timeout_s": 1.0})
    text, res = await collect(gemini.stream(req))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT and text == ""
    said = 'get_weather{"location":"Boston"}'
    assert res.usage_estimated and res.usage.output_tokens == approx_tokens(said) > 0
    await wait_idle(sim, FLASH)
    assert model_stats(sim, FLASH)["billed_output_tokens"] == res.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_a_call_the_api_could_not_parse_is_invalid_output(
    gemini: ProviderClient, sim: SimulatorServer, stream: bool
) -> None:
    """Gemini parses the model's call itself, and one it cannot parse comes back with no content
    and finish reason MALFORMED_FUNCTION_CALL: a fault of the answer, said as such, not an empty
    answer passed on."""
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.put("/admin/profile", json=profile(**{FLASH: {"malformed_json": 1.0}}))
        r.raise_for_status()
    res = await call(gemini, ask(user(ASK)), stream)
    assert res.error is not None and res.error.kind is ErrorKind.INVALID_OUTPUT
    assert res.error.message == (
        "MALFORMED_FUNCTION_CALL: the model wrote a function call the API could not parse"
    )


async def test_a_function_call_without_a_name_is_a_malformed_response(
    served: FixtureServer, recorded: ProviderClient
) -> None:
    body = load("gemini/function_call.response.json")
    del body["candidates"][0]["content"]["parts"][0]["functionCall"]["name"]
    serve(served, json.dumps(body).encode())
    res = await recorded.complete(ask(user(ASK)))
    assert res.error is not None and res.error.kind is ErrorKind.MALFORMED_RESPONSE
    assert "functionCall part without a name" in res.error.message


# -- what the adapter sends, and reads, against the reference bodies ------------------------------------


def lowered(schema: Any) -> Any:
    """A Gemini ``Schema`` (upper-case types) as the JSON Schema a client declares."""
    if isinstance(schema, dict):
        return {k: (v.lower() if k == "type" else lowered(v)) for k, v in schema.items()}
    return [lowered(v) for v in schema] if isinstance(schema, list) else schema


def specs(declarations: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(name=d["name"], description=d["description"], parameters=lowered(d["parameters"]))
        for d in declarations
    )


def declarations_sent(declarations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference's declarations as the adapter sends them: the schema, in JSON Schema's
    spelling, in ``parametersJsonSchema`` (the field that takes JSON Schema whole) rather than
    ``parameters`` (Gemini's OpenAPI subset); everything else as it is."""
    return [
        {
            "name": d["name"],
            "description": d["description"],
            "parameters_json_schema": lowered(d["parameters"]),
        }
        for d in declarations
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_the_function_call_request_is_the_reference_and_its_answer_is_read(
    served: FixtureServer, recorded: ProviderClient, stream: bool
) -> None:
    """function_call.request.json, built from our vocabulary, is sent as the reference writes it
    (its lone objects, which the REST API takes for one-element lists, as lists); the reference
    answer and captured stream come back as one call, its id made up."""
    ref = load("gemini/function_call.request.json")
    decls = ref["tools"][0]["function_declarations"]
    serve(served, raw("gemini/function_call.stream.sse" if stream else "gemini/function_call.response.json"))
    question = ref["contents"]["parts"]["text"]
    res = await call(recorded, ask(user(question), tools=specs(decls)), stream)
    assert res.ok, res.error
    ((_, _, body),) = served.requests
    assert body["contents"] == [{"role": "user", "parts": [{"text": question}]}]
    assert body["tools"] == [{"functionDeclarations": declarations_sent(decls)}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    (c,) = res.tool_calls
    assert res.finish_reason == "tool_calls" and MADE_UP.match(c.id)
    if stream:  # the captured stream: a thinking model's call (its signature is not kept)
        assert (c.name, c.arguments) == ("getWeather", '{"location":"Tokyo"}')
    else:
        assert (c.name, c.arguments) == ("find_theaters", '{"movie":"Barbie","location":"Mountain View, CA"}')


async def test_the_function_response_request_is_the_reference(
    served: FixtureServer, recorded: ProviderClient
) -> None:
    """function_response.request.json's conversation, from our vocabulary (a call with a made-up
    id, its result as JSON text), is sent as the reference writes it, but for the results' role:
    ``user``, the role the API documents for function responses now and the SDK's own loop
    sends (the reference's older ``function`` is taken too). No id goes with the call or the
    result: Gemini never gave one. The reference answer is read as text."""
    ref = load("gemini/function_response.request.json")
    asked, made, answered = ref["contents"]
    fc, fr = made["parts"][0]["functionCall"], answered["parts"][0]["functionResponse"]
    call_id = "call_" + "ab" * 16
    conversation = (
        user(asked["parts"][0]["text"]),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id=call_id, name=fc["name"], arguments=json.dumps(fc["args"])),),
        ),
        ChatMessage(role="tool", tool_call_id=call_id, name=fr["name"], content=json.dumps(fr["response"])),
    )
    serve(served, raw("gemini/function_response.response.json"))
    decls = ref["tools"][0]["functionDeclarations"]
    res = await recorded.complete(ask(*conversation, tools=specs(decls)))
    assert res.ok and res.finish_reason == "stop" and not res.tool_calls, res.error
    reference_text = load("gemini/function_response.response.json")["candidates"][0]["content"]["parts"][0]
    assert res.text == reference_text["text"]
    ((_, _, body),) = served.requests
    expected = copy.deepcopy(ref["contents"])
    expected[2]["role"] = "user"
    assert body["contents"] == expected
    assert body["tools"] == [{"functionDeclarations": declarations_sent(decls)}]


async def test_what_is_sent_is_what_the_simulator_takes(
    served: FixtureServer, recorded: ProviderClient, sim: SimulatorServer
) -> None:
    """The body the adapter sent for the reference conversation, posted to the simulator as it is
    (``parameters_json_schema`` spelling and all), is answered in text from the result."""
    ref = load("gemini/function_response.request.json")
    serve(served, raw("gemini/function_response.response.json"))
    asked, made, answered = ref["contents"]
    fc, fr = made["parts"][0]["functionCall"], answered["parts"][0]["functionResponse"]
    tool_calls = (ToolCall(id="call_" + "cd" * 16, name=fc["name"], arguments=json.dumps(fc["args"])),)
    conversation = (
        user(asked["parts"][0]["text"]),
        ChatMessage(role="assistant", content="", tool_calls=tool_calls),
        ChatMessage(role="tool", tool_call_id=tool_calls[0].id, content=json.dumps(fr["response"])),
    )
    res = await recorded.complete(ask(*conversation, tools=specs(ref["tools"][0]["functionDeclarations"])))
    assert res.ok, res.error
    ((_, headers, body),) = served.requests
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post(
            f"/v1beta/models/{FLASH}:generateContent",
            json=body,
            headers={"x-goog-api-key": headers["x-goog-api-key"]},
        )
    assert r.status_code == 200, r.text
    assert "AMC Mountain View 16" in r.json()["candidates"][0]["content"]["parts"][0]["text"]


@pytest.mark.parametrize(
    ("call_id", "sent"),
    [
        ("call_" + "ef" * 16, None),
        ("a1b2c3d4", "a1b2c3d4"),
        ("toolu_01A09q90qw90lq917835lq9", "toolu_01A09q90qw90lq917835lq9"),
    ],
    ids=["made-up", "gemini-3", "another-provider"],
)
async def test_ids_go_back_unless_made_up_here(
    served: FixtureServer, recorded: ProviderClient, call_id: str, sent: str | None
) -> None:
    """A call's id goes back with the call and with its result, unless this adapter made it up
    (Gemini never saw it); text said with the calls comes before them in the model's turn."""
    serve(served, raw("gemini/function_response.response.json"))
    c = ToolCall(id=call_id, name="get_weather", arguments='{"location": "Boston"}')
    conversation = (
        user(ASK),
        ChatMessage(role="assistant", content="Let me look.", tool_calls=(c,)),
        ChatMessage(role="tool", tool_call_id=call_id, name="get_weather", content="sunny"),
    )
    res = await recorded.complete(ask(*conversation))
    assert res.ok, res.error
    ((_, _, body),) = served.requests
    made, answered = body["contents"][1:]
    id_field = {"id": sent} if sent is not None else {}
    assert made == {
        "role": "model",
        "parts": [
            {"text": "Let me look."},
            {"functionCall": {"name": "get_weather", "args": {"location": "Boston"}, **id_field}},
        ],
    }
    assert answered == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}, **id_field}}],
    }


# -- what Gemini cannot take --------------------------------------------------------------------------

CALLED = ToolCall(id="call_" + "12" * 16, name="get_weather", arguments='{"location":"Boston"}')
REFUSED = [
    (ask(user(ASK), tools=(WEATHER.model_copy(update={"name": "1st_weather"}),)), "tool '1st_weather'"),
    (ask(user(ASK), tools=(WEATHER.model_copy(update={"name": "get weather"}),)), "tool 'get weather'"),
    (
        ask(user(ASK), tools=(WEATHER.model_copy(update={"parameters": {"type": "array"}}),)),
        "tool 'get_weather': its parameters must be a JSON Schema of type \"object\"",
    ),
    (
        ask(user(ASK), tools=(WEATHER.model_copy(update={"parameters": {"properties": {}}}),)),
        "not of type None",
    ),
    (ask(user(ASK), choice=ToolChoice(mode="function", name="get_time")), "names function 'get_time'"),
    (ask(user(ASK), tools=(), choice=ToolChoice(mode="required")), "no tools declared"),
    (
        ask(
            user(ASK),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=(CALLED.model_copy(update={"arguments": '["Boston"]'}),),
            ),
        ),
        f"tool call {CALLED.id!r} (get_weather): its arguments are not a JSON object",
    ),
    (
        ask(
            user(ASK),
            ChatMessage(
                role="assistant", content="", tool_calls=(CALLED.model_copy(update={"arguments": "{"}),)
            ),
        ),
        "its arguments are not a JSON object",
    ),
    (
        ask(user(ASK), ChatMessage(role="tool", tool_call_id="call_unknown", content="sunny")),
        "tool result for call 'call_unknown': Gemini needs the name of the function it answers",
    ),
    (
        ask(
            user(ASK),
            ChatMessage(role="assistant", content="", tool_calls=(CALLED,)),
            ChatMessage(role="tool", tool_call_id=CALLED.id, name="get_time", content="sunny"),
        ),
        "names function 'get_time', but that call was to 'get_weather'",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("req", "says"), REFUSED)
async def test_what_gemini_cannot_take_is_refused_before_sending(
    served: FixtureServer, recorded: ProviderClient, req: CallRequest, says: str, stream: bool
) -> None:
    """A bad request, named, neither sent nor billed (nothing was read), nor retried."""
    serve(served, raw("gemini/function_call.response.json"))
    res = await call(recorded, req, stream)
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert says in res.error.message, res.error.message
    assert served.requests == [] and res.cost_usd == 0 and res.attempts == 1
