"""What the ensemble does with tools, driven through the engine's one seam (``ScriptedCaller``):
the vote, the aggregator deciding, validation of every final call and the chain it falls down,
the tool choice held, the answer held back until decided when streamed, and the cache's keys.

The adapters' native tool APIs are proven over the wire in test_tools_<provider>.py and the
whole path through the API with the official clients in test_api_tools.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from moa import MoAEngine, load_config
from moa.cache import ResponseCache
from moa.cache.store import MemoryStore
from moa.config import CacheConfig
from moa.engine.toolcalls import canonical, check, vote
from moa.errors import AllProvidersFailed
from moa.plan import Plan
from moa.result import MoAResult, Stage
from moa.testing import Reply, ScriptedCaller
from moa.types import CallResult, ChatMessage, ErrorKind, TextDelta, ToolCall, ToolChoice, ToolSet, ToolSpec
from tests.otlp_receiver import OTLPReceiver
from tests.test_engine_scripted import AGG1, AGG2, P1, P2, P3, engine
from tests.test_engine_scripted import plan as scripted_plan

QUESTION = [ChatMessage(role="user", content="What is the weather in Paris, in celsius?")]
WEATHER = ToolSpec(
    name="get_weather",
    description="The current weather in a city.",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
)
TIME = ToolSpec(name="get_time", parameters={"type": "object", "properties": {"city": {"type": "string"}}})
TOOLS = ToolSet(tools=(WEATHER, TIME))


def call(
    name: str = "get_weather", args: str = '{"city": "Paris", "unit": "celsius"}', id_: str = "c1"
) -> ToolCall:
    return ToolCall(id=id_, name=name, arguments=args)


def plan(**update: object) -> Plan:
    """test_engine_scripted's plan (three proposers, a quorum of two, two aggregators) without its
    fallback model."""
    return scripted_plan(**{"fallbacks": [], **update})


def result_of(res: CallResult | None = None, **update: object) -> CallResult:
    base = CallResult(provider="p", provider_kind="x", requested_model="m", tool_calls=[call()])
    return base.model_copy(update=update)


# -- the pure rules ----------------------------------------------------------------------------------


def test_canonical_calls_ignore_key_order_spacing_and_call_order() -> None:
    a = [call(args='{"city": "Paris", "unit": "celsius"}'), call("get_time", '{"city":"Oslo"}', "c2")]
    b = [
        call("get_time", '{ "city" : "Oslo" }', "x"),
        call(args='{"unit":"celsius","city":"Paris"}', id_="y"),
    ]
    assert canonical(a) == canonical(b)
    assert canonical([call(args='{"city": "Pariss"}')]) != canonical([call(args='{"city": "Paris"}')])
    assert canonical([call(args='{"city": ')]) is None  # malformed arguments agree with nothing


def test_the_vote_needs_its_quorum_of_identical_calls() -> None:
    same = [result_of(), result_of(tool_calls=[call(args='{"unit":"celsius","city":"Paris"}')])]
    other = result_of(tool_calls=[call(args='{"city": "Lyon"}')])
    text = result_of(tool_calls=[], text="It is sunny.")
    decided = vote([*same, other], 2)
    assert decided.winner is not None and decided.outcome.decided and decided.outcome.agreed == 2
    split = vote([same[0], other, text], 2)
    assert split.winner is None and split.outcome.agreed == 1 and not split.outcome.decided
    assert vote([text, text], 1).winner is None  # text answers vote for no calls


@pytest.mark.parametrize(
    ("tools", "calls", "text", "violation"),
    [
        (TOOLS, [call("get_wether")], "", "get_wether is not a declared function"),
        (TOOLS, [call(args='{"unit": "celsius"}')], "", "'city' is a required property"),
        (TOOLS, [call(args='{"city": 7}')], "", "arguments.city: 7 is not of type 'string'"),
        (TOOLS, [call(args='{"city": "Paris", "unit": "kelvin"}')], "", "'kelvin' is not one of"),
        (TOOLS, [call(args='{"city": "Paris", "wind": 1}')], "", "Additional properties are not allowed"),
        (TOOLS, [call(args='{"city": "Par')], "", "arguments are not valid JSON"),
        (TOOLS, [call(args='["Paris"]')], "", "arguments must be a JSON object"),
        (TOOLS.model_copy(update={"choice": ToolChoice(mode="none")}), [call()], "", "tool_choice is none"),
        (
            TOOLS.model_copy(update={"choice": ToolChoice(mode="required")}),
            [],
            "Sunny.",
            "requires at least one",
        ),
        (
            TOOLS.model_copy(update={"choice": ToolChoice(mode="function", name="get_time")}),
            [call()],
            "",
            "tool_choice names get_time, but the answer calls get_weather",
        ),
        (
            TOOLS.model_copy(update={"parallel": False}),
            [call(), call("get_time", '{"city": "Paris"}', "c2")],
            "",
            "parallel_tool_calls is false",
        ),
    ],
)
def test_every_way_an_answer_breaks_the_tools_contract_is_named(
    tools: ToolSet, calls: list[ToolCall], text: str, violation: str
) -> None:
    verdict = check(result_of(tool_calls=calls, text=text), tools)
    assert not verdict.ok and any(violation in v for v in verdict.violations), verdict.violations


def test_a_valid_answer_passes() -> None:
    assert check(result_of(), TOOLS).ok
    assert check(result_of(tool_calls=[], text="Sunny."), TOOLS).ok  # auto: text is an answer
    named = TOOLS.model_copy(update={"choice": ToolChoice(mode="function", name="get_weather")})
    assert check(result_of(), named).ok


# -- through the engine ------------------------------------------------------------------------------


async def test_a_quorum_of_agreeing_proposals_answers_with_no_aggregator_call() -> None:
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="", tool_calls=(call(id_="a"),)))
    caller.script(P2, Reply(text="", tool_calls=(call(args='{"unit":"celsius","city":"Paris"}', id_="b"),)))
    caller.script(P3, Reply(text="Let me look.", tool_calls=(call(args='{"city": "Lyon"}'),)))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS)
    assert not caller.calls_to(AGG1) and not caller.calls_to(AGG2)
    assert result.answer_source == "vote" and result.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert result.tool_vote is not None and result.tool_vote.decided and result.tool_vote.agreed == 2
    # Every proposer saw the tools; each proposal's calls are in the detail.
    assert all(c.request.tools == TOOLS for key in (P1, P2, P3) for c in caller.calls_to(key))
    proposals = [c for c in result.calls if c.stage is Stage.PROPOSER]
    assert sorted(json.loads(c.tool_calls[0].arguments)["city"] for c in proposals) == [
        "Lyon",
        "Paris",
        "Paris",
    ]


async def test_without_agreement_the_aggregator_decides_reading_the_proposed_calls() -> None:
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="", tool_calls=(call(),)))
    caller.script(P2, Reply(text="", tool_calls=(call(args='{"city": "Lyon"}'),)))
    caller.script(P3, Reply(text="I would ask for the weather in Paris."))
    caller.script(AGG1, Reply(text="", tool_calls=(call(id_="agg"),)))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS)
    (agg,) = caller.calls_to(AGG1)
    assert agg.request.tools == TOOLS  # the aggregator decides under the same tools
    prompt = "\n".join(m.content for m in agg.request.messages)
    assert 'get_weather({"city": "Lyon"})' in prompt and "weather in Paris" in prompt
    assert result.answer_source == "aggregator" and result.tool_calls[0].id == "agg"
    assert result.tool_vote is not None and not result.tool_vote.decided


async def test_aggregate_mode_asks_the_aggregator_even_when_the_proposals_agree() -> None:
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text="", tool_calls=(call(),)))
    caller.script(AGG1, Reply(text="", tool_calls=(call(id_="agg"),)))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS, tool_mode="aggregate")
    assert len(caller.calls_to(AGG1)) == 1 and result.answer_source == "aggregator"
    # The plan's own mode selects it too.
    caller2 = ScriptedCaller()
    for key in (P1, P2, P3):
        caller2.script(key, Reply(text="", tool_calls=(call(),)))
    caller2.script(AGG1, Reply(text="", tool_calls=(call(id_="agg"),)))
    await engine(caller2).run(QUESTION, plan=plan(tools="aggregate"), tools=TOOLS)
    assert len(caller2.calls_to(AGG1)) == 1


async def test_an_invalid_call_goes_to_the_next_aggregator_with_the_violation_in_its_prompt() -> None:
    caller = ScriptedCaller()
    caller.script(P1, "Paris, celsius.")
    caller.script(P2, "Paris.")
    caller.script(P3, "Paris?")
    caller.script(AGG1, Reply(text="", tool_calls=(call(args='{"city": "Paris", "unit": "kelvin"}'),)))
    caller.script(AGG2, Reply(text="", tool_calls=(call(id_="fixed"),)))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS)
    assert result.tool_calls[0].id == "fixed" and (result.provider, result.model) == ("a", "second")
    (second,) = caller.calls_to(AGG2)
    prompt = "\n".join(m.content for m in second.request.messages)
    assert "'kelvin' is not one of ['celsius', 'fahrenheit']" in prompt
    (rejected,) = [c for c in result.calls if c.provider == "a" and c.model == "first"]
    assert rejected.error_kind is ErrorKind.INVALID_OUTPUT and "kelvin" in (rejected.error_message or "")
    assert any("answer rejected" in n for n in result.notes)


async def test_an_exhausted_chain_is_a_clean_error_naming_the_tool_and_the_violation() -> None:
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, "no idea")
    caller.script(AGG1, Reply(text="", tool_calls=(call("launch_rocket", "{}"),)))
    caller.script(AGG2, Reply(text="", tool_calls=(call(args='{"unit": "celsius"}'),)))
    with pytest.raises(AllProvidersFailed) as caught:
        await engine(caller).run(QUESTION, plan=plan(on_aggregators_failed="fail"), tools=TOOLS)
    message = caught.value.message
    assert caught.value.status_code == 502 and caught.value.code == "invalid_tool_calls"
    assert "launch_rocket is not a declared function" in message
    assert "get_weather: 'city' is a required property" in message


async def test_a_proposal_that_breaks_the_contract_never_answers_as_the_salvage() -> None:
    """Every aggregator failed: the best proposal answers only if its calls are valid."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="", tool_calls=(call("nope", "{}"),)))
    caller.script(P2, Reply(text="", tool_calls=(call(args='{"city": "Oslo"}'),)))
    caller.script(P3, Reply(text="", tool_calls=(call(args='{"city": 3}'),)))
    for key in (AGG1, AGG2):
        caller.script(key, Reply(error=ErrorKind.SERVER_ERROR))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS)
    assert result.answer_source == "proposal"
    assert json.loads(result.tool_calls[0].arguments) == {"city": "Oslo"}


async def test_tool_choice_none_gets_text_and_required_gets_a_call() -> None:
    none = TOOLS.model_copy(update={"choice": ToolChoice(mode="none")})
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, "It is 18 degrees in Paris.")
    caller.script(AGG1, Reply(text="", tool_calls=(call(),)))  # calls though it may not
    caller.script(AGG2, "It is 18 degrees in Paris.")
    result = await engine(caller).run(QUESTION, plan=plan(), tools=none)
    assert result.tool_calls == [] and result.text.startswith("It is 18") and result.provider == "a"

    required = TOOLS.model_copy(update={"choice": ToolChoice(mode="required")})
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, "Paris")
    caller.script(AGG1, "It is sunny in Paris.")  # text though a call is required
    caller.script(AGG2, Reply(text="", tool_calls=(call(),)))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=required)
    assert result.tool_calls and result.model == "second"


async def test_a_streamed_tool_answer_is_held_until_decided_then_replayed() -> None:
    """Staircase cannot climb with tools (a call cannot be streamed before it is decided): the run
    goes final, no text goes out before the answer is validated, and a text answer is replayed."""
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, "The weather in Paris is mild today.")
    caller.script(AGG1, Reply(text="", tool_calls=(call(args='{"city": 1}'),)))
    caller.script(AGG2, "It is mild in Paris today, about eighteen degrees.")
    events = [
        ev async for ev in engine(caller).stream(QUESTION, plan=plan(aggregation="staircase"), tools=TOOLS)
    ]
    result = events[-1]
    assert isinstance(result, MoAResult) and result.plan.aggregation == "final"
    texts = "".join(ev.text for ev in events if isinstance(ev, TextDelta))
    assert texts == result.text and result.model == "second"  # nothing of the rejected answer went out
    assert all(c.staircase_step is None for c in result.calls)


async def test_a_single_model_plan_validates_its_call_too() -> None:
    caller = ScriptedCaller()
    caller.script(AGG1, Reply(text="", tool_calls=(call(args="{}"),)), Reply(text="", tool_calls=(call(),)))
    single = Plan.model_validate(
        {"aggregators": [{"provider": "a", "model": "first"}], "fallbacks": [], "call_timeout_s": 600}
    )
    with pytest.raises(AllProvidersFailed) as caught:
        await engine(caller).run(QUESTION, plan=single, tools=TOOLS)
    assert "'city' is a required property" in caught.value.message


async def test_cache_keys_hold_the_tools_and_a_cached_call_is_replayed_exactly() -> None:
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text="", tool_calls=(call(),)))
    config = load_config(None)
    cache = ResponseCache(CacheConfig(enabled=True), MemoryStore(1 << 20))
    eng = MoAEngine(config, caller, cache=cache)
    first = await eng.run(QUESTION, plan=plan(), tools=TOOLS)
    again = await eng.run(QUESTION, plan=plan(), tools=TOOLS)
    assert again.cache.status == "hit-exact" and again.tool_calls == first.tool_calls
    assert again.finish_reason == "tool_calls"
    for other in (
        TOOLS.model_copy(update={"choice": ToolChoice(mode="required")}),
        TOOLS.model_copy(update={"parallel": False}),
        ToolSet(tools=(WEATHER,)),
    ):
        miss = await eng.run(QUESTION, plan=plan(), tools=other)
        assert miss.cache.status == "miss", other
    plain = await eng.run(QUESTION, plan=plan())
    assert plain.cache.status == "miss"
    # A conversation that goes on with the call's result is another key.
    turn = [
        *QUESTION,
        ChatMessage(role="assistant", content="", tool_calls=(call(),)),
        ChatMessage(role="tool", content='{"temp": 18}', tool_call_id="c1", name="get_weather"),
    ]
    for key in (P1, P2, P3):
        caller.script(key, "It is 18 degrees.")
    caller.script(AGG1, "It is 18 degrees in Paris.")
    after = await eng.run(turn, plan=plan(), tools=TOOLS)
    assert after.cache.status == "miss" and after.text == "It is 18 degrees in Paris."


async def test_auto_sends_a_tool_request_no_deeper_than_the_configured_tier() -> None:
    from moa.engine.router import RouterPolicy
    from moa.plan import Complexity

    config = load_config(None)
    complex_prompt = [
        ChatMessage(
            role="user",
            content="Design a distributed, fault-tolerant scheduler: analyse the trade-offs of leader "
            "election, compare Raft and Paxos step by step, prove the invariants, and write the code.",
        )
    ]
    free = RouterPolicy(config)
    _, decision, _ = await free.route(complex_prompt, "auto", tools=True)
    assert decision.complexity is Complexity.COMPLEX and decision.preset == "moa"  # no rule: as classified
    capped_cfg = config.model_copy(
        update={"router": config.router.model_copy(update={"tools_max_tier": Complexity.MEDIUM})}
    )
    capped = RouterPolicy(capped_cfg)
    _, decision, _ = await capped.route(complex_prompt, "auto", tools=True)
    assert decision.preset == "moa-lite" and "router.tools_max_tier" in decision.reason
    _, decision, _ = await capped.route(complex_prompt, "auto")  # without tools: untouched
    assert decision.preset == "moa"


async def test_the_trace_shows_the_vote_and_each_rejected_answer(otlp: OTLPReceiver) -> None:
    from moa_observability.tracing import tracer
    from tests.helpers import by_name, wait_for_spans

    caller = ScriptedCaller()
    caller.script(P1, Reply(text="", tool_calls=(call(),)))
    caller.script(P2, Reply(text="", tool_calls=(call(args='{"city": "Lyon"}'),)))
    caller.script(P3, "Paris, I think.")
    caller.script(AGG1, Reply(text="", tool_calls=(call("get_wether", "{}"),)))
    caller.script(AGG2, Reply(text="", tool_calls=(call(id_="ok"),)))
    with tracer().start_as_current_span("client request") as root:
        await engine(caller).run(QUESTION, plan=plan(), tools=TOOLS)
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "moa.fuse"})
    (run,) = by_name(spans, "moa.run")
    attrs = run["attributes"]
    assert (attrs["moa.tools.vote.proposals"], attrs["moa.tools.vote.agreed"]) == (3, 1)
    assert attrs["moa.tools.vote.needed"] == 2 and attrs["moa.tools.vote.decided"] is False
    (fuse,) = by_name(spans, "moa.fuse")
    (rejected,) = [e for e in fuse["events"] if e["name"] == "moa.tools.rejected"]
    assert rejected["attributes"]["moa.model"] == "a/first"
    assert "get_wether is not a declared function" in rejected["attributes"]["moa.tools.violations"]


async def test_the_tool_definitions_count_in_the_projected_cost() -> None:
    from moa.engine.cost import project
    from moa.types import GenerationParams, priced_messages

    config = load_config(None)
    preset = config.presets["moa-lite"]
    params = GenerationParams(max_tokens=100)
    bare = project(config, preset, QUESTION, params)
    big = ToolSet(
        tools=tuple(
            WEATHER.model_copy(update={"name": f"tool_{i}", "description": "x " * 400}) for i in range(20)
        )
    )
    with_tools = project(config, preset, priced_messages(QUESTION, big), params)
    # Twenty tools of some 400 tokens each, read by every one of moa-lite's calls.
    assert with_tools.tokens - bare.tokens >= 20 * 400 * 4
    assert with_tools.cost_usd > bare.cost_usd


async def test_early_aggregation_votes_on_the_quorum_in_hand_and_cuts_the_straggler() -> None:
    """``early`` with tools: once the quorum of proposals is in, the vote (or the aggregator)
    decides; the straggler still writing is cut and recorded as such."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="", tool_calls=(call(id_="a"),), at_step=1))
    caller.script(P2, Reply(text="", tool_calls=(call(id_="b"),), at_step=1))
    caller.script(P3, Reply(text="", tool_calls=(call(args='{"city": "Lyon"}'),), at_step=99))
    run = asyncio.create_task(engine(caller).run(QUESTION, plan=plan(aggregation="early"), tools=TOOLS))
    await caller.wait_started(3)
    await caller.advance(1)
    result = await run
    assert result.answer_source == "vote" and result.tool_vote is not None and result.tool_vote.proposals == 2
    cut = [c for c in result.calls if c.stage is Stage.PROPOSER and c.cancelled_straggler]
    assert [f"{c.provider}/{c.model}" for c in cut] == [P3]
