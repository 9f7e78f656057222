"""Agent loops through the ensemble, as agent frameworks run them: call a tool, run it, send its
result, get the final answer. Each with the official ``openai`` client, LangChain's
``bind_tools`` and the OpenAI Agents SDK's chat-completions model, streamed and not, against
``moa serve --local``'s app and against the Ray app (the session cluster, two nodes), every
provider answering through its own tool API over the simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from moa.simulator.server import SimulatorServer
from tests.helpers import RAY_MODULE, ApiServer

PRESET = "moa-lite"
ASK = "What is the weather in Paris right now?"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
FORECAST = {"city": "Paris", "temperature_c": 18, "sky": "clear"}


# The module uses the session Ray cluster, so it runs with the other cluster modules, last.
pytestmark = RAY_MODULE


@pytest.fixture(params=["local", "ray"])
def base_url(request: pytest.FixtureRequest, sim: SimulatorServer, cluster: dict[str, Any]) -> Iterator[str]:
    """The service's OpenAI-compatible base URL: ``moa serve --local``'s app, or the Ray app (the
    session cluster's; named here, not looked up, so the module is ordered with the cluster's)."""
    if request.param == "ray":
        yield str(cluster["url"]) + "/v1"
        return
    from moa.config import SimulatorMode, load_config

    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})}
    )
    with ApiServer(cfg) as server:
        yield server.url + "/v1"


def get_weather(city: str) -> str:
    """The tool the agents run: what a weather service would answer."""
    return json.dumps(FORECAST | {"city": city})


# -- the official openai client -------------------------------------------------------------------


def _stream_call(
    client: openai.OpenAI, messages: list[dict[str, Any]]
) -> tuple[str, list[dict[str, str]], str]:
    """A streamed turn, assembled as a client assembles one: its text, its calls, its finish."""
    text, calls, finish = "", {}, ""
    stream = client.chat.completions.create(
        model=PRESET,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                if d.function is not None:
                    slot["name"] = d.function.name or slot["name"]
                    slot["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_loop_with_the_openai_client(base_url: str, stream: bool) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=90)
    messages: list[dict[str, Any]] = [{"role": "user", "content": ASK}]
    ran: list[str] = []
    for _turn in range(3):
        if stream:
            text, calls, finish = _stream_call(client, messages)
        else:
            r = client.chat.completions.create(
                model=PRESET,
                messages=messages,  # type: ignore[arg-type]
                tools=[WEATHER_TOOL],  # type: ignore[list-item]
            )
            message = r.choices[0].message
            text, finish = message.content or "", r.choices[0].finish_reason
            calls = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in message.tool_calls or []
                if c.type == "function"
            ]
        if finish != "tool_calls":
            break
        messages.append(
            {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ],
            }
        )
        for c in calls:
            assert c["name"] == "get_weather"
            city = json.loads(c["arguments"])["city"]
            ran.append(city)
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": get_weather(city)})
    assert ran == ["Paris"] and finish == "stop"
    assert "18" in text  # the final answer read the tool's result


# -- LangChain ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_loop_with_langchains_bind_tools(base_url: str, stream: bool) -> None:
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool("get_weather")
    def weather(city: str) -> str:
        """Get the current weather in a city."""
        return get_weather(city)

    llm = ChatOpenAI(model=PRESET, base_url=base_url, api_key="unused", max_retries=0, timeout=90)  # type: ignore[arg-type]
    bound = llm.bind_tools([weather])

    def turn(messages: list[BaseMessage]) -> AIMessage:
        if not stream:
            out = bound.invoke(messages)
            assert isinstance(out, AIMessage)
            return out
        gathered: Any = None
        for chunk in bound.stream(messages):
            gathered = chunk if gathered is None else gathered + chunk
        return AIMessage(content=gathered.content, tool_calls=gathered.tool_calls)

    messages: list[BaseMessage] = [HumanMessage(ASK)]
    first = turn(messages)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"} and call["id"]
    result = weather.invoke(call["args"])
    final = turn([*messages, first, ToolMessage(content=result, tool_call_id=call["id"])])
    assert not final.tool_calls and "18" in str(final.content)


# -- the OpenAI Agents SDK ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_with_the_openai_agents_sdk(base_url: str, stream: bool) -> None:
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI's platform, which is not reachable
    ran: list[str] = []

    @function_tool
    def weather_tool(city: str) -> str:
        """Get the current weather in a city."""
        ran.append(city)
        return get_weather(city)

    weather_tool.name = "get_weather"
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=90)
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[weather_tool],
        model=OpenAIChatCompletionsModel(model=PRESET, openai_client=client),
    )
    if stream:
        streamed = Runner.run_streamed(agent, ASK)
        async for _event in streamed.stream_events():
            pass
        output = streamed.final_output
    else:
        output = (await Runner.run(agent, ASK)).final_output
    assert ran == ["Paris"] and "18" in str(output)


class Forecast(BaseModel):
    city: str
    temperature_c: float
    sky: str


@pytest.mark.parametrize("stream", [False, True])
def test_a_structured_answer_with_the_openai_clients_parse(base_url: str, stream: bool) -> None:
    """``parse`` (and ``stream``) with a pydantic model, through the ensemble: the document the
    aggregator wrote, validated against the model's schema before it left the service."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=90)
    messages: Any = [{"role": "user", "content": ASK}]
    if stream:
        with client.chat.completions.stream(model=PRESET, messages=messages, response_format=Forecast) as s:
            final = s.get_final_completion()
    else:
        final = client.chat.completions.parse(model=PRESET, messages=messages, response_format=Forecast)
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and parsed.city == "Paris", final
