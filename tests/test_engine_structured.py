"""What the ensemble does with a response format, driven through the engine's one seam
(``ScriptedCaller``): who is asked for the format, validation of the final document and the chain
it falls down (the violations in the next model's prompt), the vote among proposers' documents,
a refusal, the answer held back until validated when streamed, and the cache's keys.

The whole path through the API with the official clients is in test_api_structured.py."""

from __future__ import annotations

import json

import pytest

from moa.cache import keys
from moa.engine import structured
from moa.engine.contract import Contract
from moa.errors import AllProvidersFailed
from moa.plan import Plan
from moa.result import MoAResult, Stage
from moa.testing import Reply, ScriptedCaller
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    GenerationParams,
    ResponseFormat,
    TextDelta,
    prompt_texts,
)
from tests.otlp_receiver import OTLPReceiver
from tests.test_engine_scripted import AGG1, AGG2, P1, P2, P3, engine
from tests.test_engine_scripted import plan as scripted_plan

QUESTION = [ChatMessage(role="user", content="What is the weather in Paris?")]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "sky": {"type": "string", "enum": ["clear", "cloudy"]},
        "temperature_c": {"type": "number"},
    },
    "required": ["city", "sky", "temperature_c"],
    "additionalProperties": False,
}
WEATHER = ResponseFormat(type="json_schema", name="weather", schema=SCHEMA, strict=True)
OBJECT = ResponseFormat(type="json_object")
GOOD = '{"city": "Paris", "sky": "clear", "temperature_c": 18}'


def plan(**update: object) -> Plan:
    """test_engine_scripted's plan (three proposers, a quorum of two, two aggregators) without its
    fallback model."""
    return scripted_plan(**{"fallbacks": [], **update})


def answer(text: str) -> CallResult:
    return CallResult(provider="p", provider_kind="x", requested_model="m", text=text)


def requests_to(caller: ScriptedCaller, key: str) -> list[CallRequest]:
    return [c.request for c in caller.calls if f"{c.request.provider}/{c.request.model}" == key]


def system_text(req: CallRequest) -> str:
    return "\n".join(m.content for m in req.messages if m.role == "system")


# -- the pure rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "violation"),
    [
        ('{"city": "Paris", "sky": "clear"', "the answer is not valid JSON"),
        ('{"city": "Paris", "sky": "clear"}', "$: 'temperature_c' is a required property"),
        ('{"city": "Paris", "sky": "rainy", "temperature_c": 18}', "$.sky: 'rainy' is not one of"),
        ('{"city": 7, "sky": "clear", "temperature_c": 18}', "$.city: 7 is not of type 'string'"),
        (GOOD[:-1] + ', "wind": 3}', "$: Additional properties are not allowed"),
        ("Sure! " + GOOD, "the answer is not valid JSON"),
    ],
)
def test_a_document_the_schema_refuses_is_named_by_its_violation(text: str, violation: str) -> None:
    verdict = Contract(response_format=WEATHER).check(answer(text))
    assert not verdict.ok and verdict.violations[0].startswith(violation), verdict.violations


def test_a_json_fence_is_tolerated_and_removed_json_object_asks_for_an_object() -> None:
    fenced = Contract(response_format=WEATHER).check(answer(f"```json\n{GOOD}\n```"))
    assert fenced.ok and fenced.result.text == GOOD  # the client gets the bare document
    assert not Contract(response_format=WEATHER).check(answer(f"Here:\n```json\n{GOOD}\n```")).ok
    assert Contract(response_format=OBJECT).check(answer('{"a": 1}')).ok
    assert Contract(response_format=OBJECT).check(answer("[1, 2]")).violations == (
        "the answer must be a JSON object, not list",
    )
    refused = answer("").model_copy(update={"refusal": "I cannot help with that."})
    assert Contract(response_format=WEATHER).check(refused).ok  # a refusal is an answer


def test_canonical_documents_ignore_key_order_and_spacing() -> None:
    other = '{ "temperature_c": 18, "sky": "clear", "city": "Paris" }'
    assert structured.canonical(answer(GOOD)) == structured.canonical(answer(other))
    assert structured.canonical(answer(GOOD.replace("18", "19"))) != structured.canonical(answer(GOOD))
    assert structured.canonical(answer(GOOD.replace("18", "18.0"))) == structured.canonical(answer(GOOD))
    assert structured.canonical(answer("not json")) is None


def test_the_schema_is_prompt_tokens_and_part_of_every_cache_key() -> None:
    assert json.dumps(SCHEMA, separators=(",", ":")) in prompt_texts(QUESTION, None, WEATHER)
    assert prompt_texts(QUESTION, None, OBJECT) == prompt_texts(QUESTION)
    other = WEATHER.model_copy(update={"json_schema": {**SCHEMA, "required": ["city"]}})
    finals = {
        keys.final_key("s", QUESTION, plan(), GenerationParams(), None, fmt)
        for fmt in (None, OBJECT, WEATHER, other)
    }
    assert len(finals) == 4
    req = CallRequest(provider="p", model="m", messages=tuple(QUESTION))
    assert keys.proposal_key("s", req) != keys.proposal_key(
        "s", req.model_copy(update={"response_format": OBJECT})
    )


# -- through the engine ------------------------------------------------------------------------------


async def test_the_aggregator_is_asked_for_the_format_and_the_proposers_answer_freely() -> None:
    caller = ScriptedCaller(default="Paris is clear today, about 18 degrees.")
    caller.script(AGG1, Reply(text=GOOD))
    result = await engine(caller).run(QUESTION, plan=plan(), response_format=WEATHER)
    assert json.loads(result.text) == json.loads(GOOD) and result.answer_source == "aggregator"
    (agg,) = requests_to(caller, AGG1)
    assert agg.response_format == WEATHER
    assert "must conform to this JSON Schema" in system_text(agg) and '"temperature_c"' in system_text(agg)
    for key in (P1, P2, P3):
        (prop,) = requests_to(caller, key)
        assert prop.response_format is None and "JSON" not in system_text(prop)


async def test_an_invalid_document_goes_to_the_next_aggregator_with_its_violation() -> None:
    caller = ScriptedCaller(default="Paris is clear today.")
    caller.script(AGG1, Reply(text='{"city": "Paris", "sky": "rainy", "temperature_c": 18}'))
    caller.script(AGG2, Reply(text=f"```json\n{GOOD}\n```"))
    result = await engine(caller).run(QUESTION, plan=plan(), response_format=WEATHER)
    assert result.text == GOOD and result.provider == "a" and result.model == "second"
    first = next(c for c in result.calls if c.model == "first")
    assert first.error_kind == "invalid_output" and "'rainy' is not one of" in (first.error_message or "")
    (second,) = requests_to(caller, AGG2)
    told = system_text(second)
    assert "rejected because the answer is not the JSON document" in told and "$.sky: 'rainy'" in told
    assert any("answer rejected" in n for n in result.notes)


async def test_when_every_model_writes_an_invalid_document_the_run_ends_invalid_structured_output() -> None:
    caller = ScriptedCaller(default="Paris is clear today.")  # prose: the proposals cannot answer either
    caller.script(AGG1, Reply(text="not JSON at all"))
    caller.script(AGG2, Reply(text="[1, 2, 3]"))
    with pytest.raises(AllProvidersFailed) as info:
        await engine(caller).run(QUESTION, plan=plan(), response_format=OBJECT)
    error = info.value
    assert error.status_code == 502 and error.code == "invalid_structured_output", error
    assert (
        "the answer is not valid JSON" in error.message and "must be a JSON object, not list" in error.message
    )


async def test_a_proposal_answers_for_failed_aggregators_only_with_a_valid_document() -> None:
    caller = ScriptedCaller(default=GOOD)
    caller.script(P1, Reply(text="prose first"))
    caller.script(AGG1, Reply(text="nope"))
    caller.script(AGG2, Reply(text="nope"))
    result = await engine(caller).run(
        QUESTION, plan=plan(on_aggregators_failed="proposal"), response_format=WEATHER
    )
    assert result.answer_source == "proposal" and result.provider == "p" and result.model == "two"


async def test_proposers_asked_for_the_format_vote_and_no_aggregator_is_called() -> None:
    caller = ScriptedCaller(default="unused")
    caller.script(P1, Reply(text=GOOD))
    caller.script(P2, Reply(text='{"temperature_c": 18.0, "city": "Paris", "sky": "clear"}'))
    caller.script(P3, Reply(text='{"city": "Lyon", "sky": "clear", "temperature_c": 18}'))
    result = await engine(caller).run(QUESTION, plan=plan(structured="proposers"), response_format=WEATHER)
    assert result.answer_source == "vote" and json.loads(result.text) == json.loads(GOOD)
    assert not [c for c in result.calls if c.stage is Stage.AGGREGATOR]
    vote = result.document_vote
    assert vote is not None and vote.decided and vote.agreed == 2 and vote.needed == 2
    assert all(r.response_format == WEATHER for k in (P1, P2, P3) for r in requests_to(caller, k))


async def test_a_split_or_invalid_vote_leaves_the_document_to_the_aggregator() -> None:
    caller = ScriptedCaller(default="unused")
    caller.script(P1, Reply(text='{"city": "Paris", "sky": "rainy", "temperature_c": 18}'))
    caller.script(P2, Reply(text='{"city": "Paris", "sky": "rainy", "temperature_c": 18}'))
    caller.script(P3, Reply(text=GOOD))
    caller.script(AGG1, Reply(text=GOOD))
    result = await engine(caller).run(QUESTION, plan=plan(structured="proposers"), response_format=WEATHER)
    assert result.answer_source == "aggregator" and result.document_vote is not None
    assert result.document_vote.agreed == 2 and not result.document_vote.decided  # agreed, but invalid
    assert "'rainy' is not one of" in (result.document_vote.reason or "")


async def test_a_refusal_is_returned_as_the_answer() -> None:
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text="", refusal="I'm sorry, I cannot assist with that request."))
    result = await engine(caller).run(QUESTION, plan=plan(), response_format=WEATHER)
    assert result.refusal == "I'm sorry, I cannot assist with that request." and result.text == ""
    assert not requests_to(caller, AGG2)


async def test_a_streamed_document_is_held_until_validated() -> None:
    """The first aggregator's invalid document never reaches the stream: the client's deltas are
    exactly the second's valid one."""
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text='{"city": "Paris", "sky": "rainy", "temperature_c": 18}'))
    caller.script(AGG2, Reply(text=GOOD))
    text, result = "", None
    async for ev in engine(caller).stream(QUESTION, plan=plan(), response_format=WEATHER):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, MoAResult):
            result = ev
    assert result is not None and text == result.text == GOOD


async def test_a_structured_request_never_climbs_the_staircase() -> None:
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text=GOOD))
    result = None
    async for ev in engine(caller).stream(
        QUESTION, plan=plan(aggregation="staircase"), response_format=OBJECT
    ):
        if isinstance(ev, MoAResult):
            result = ev
    assert result is not None and result.plan.aggregation == "final" and json.loads(result.text)


async def test_the_trace_shows_the_validation_the_vote_and_each_rejected_document(otlp: OTLPReceiver) -> None:
    from moa_observability.tracing import tracer
    from tests.helpers import by_name, wait_for_spans

    caller = ScriptedCaller()
    caller.script(P1, Reply(text=GOOD))
    caller.script(P2, Reply(text="Clear, 18 degrees."))
    caller.script(P3, Reply(text=GOOD.replace("Paris", "Lyon")))
    caller.script(AGG1, Reply(text='{"city": "Paris"}'))
    caller.script(AGG2, Reply(text=GOOD))
    with tracer().start_as_current_span("client request") as root:
        await engine(caller).run(QUESTION, plan=plan(structured="proposers"), response_format=WEATHER)
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "moa.fuse"})
    (run,) = by_name(spans, "moa.run")
    attrs = run["attributes"]
    assert attrs["moa.structured.format"] == "json_schema" and attrs["moa.structured.valid"] is True
    assert attrs["moa.structured.refused"] is False
    assert (attrs["moa.structured.vote.proposals"], attrs["moa.structured.vote.agreed"]) == (3, 1)
    assert attrs["moa.structured.vote.decided"] is False
    (fuse,) = by_name(spans, "moa.fuse")
    (rejected,) = [e for e in fuse["events"] if e["name"] == "moa.structured.rejected"]
    assert rejected["attributes"]["moa.model"] == "a/first"
    assert "'sky' is a required property" in rejected["attributes"]["moa.structured.violations"]


async def test_a_refine_rounds_synthesis_is_free_text_and_only_the_final_answer_a_document() -> None:
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text="A synthesis in prose."), Reply(text=GOOD))
    result = await engine(caller).run(QUESTION, plan=plan(mode="refine", rounds=2), response_format=WEATHER)
    assert result.text == GOOD
    first, last = requests_to(caller, AGG1)
    assert first.response_format is None and "JSON Schema" not in system_text(first)
    assert last.response_format == WEATHER and "JSON Schema" in system_text(last)


async def test_with_tools_too_calls_are_held_to_the_tools_and_text_to_the_format() -> None:
    from moa.types import ToolCall, ToolSet, ToolSpec

    tools = ToolSet(tools=(ToolSpec(name="get_weather", parameters={"type": "object"}),))
    calls = (ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}'),)
    contract = Contract(tools, WEATHER)
    assert contract.check(answer("").model_copy(update={"tool_calls": list(calls)})).ok
    assert not contract.check(
        answer("").model_copy(update={"tool_calls": [calls[0].model_copy(update={"name": "x"})]})
    ).ok
    assert contract.check(answer(GOOD)).ok and not contract.check(answer("It is sunny.")).ok
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text="It is sunny."))
    caller.script(AGG2, Reply(text="", tool_calls=calls))
    result = await engine(caller).run(QUESTION, plan=plan(), tools=tools, response_format=WEATHER)
    assert [c.name for c in result.tool_calls] == ["get_weather"] and result.model == "second"


async def test_a_text_answer_breaking_the_tools_contract_is_a_tools_rejection(otlp: OTLPReceiver) -> None:
    """What a rejection is named by is what it broke: text where a call was required is the
    tools' (``moa.tools.rejected``), even though the answer carries no call."""
    from moa.types import ToolCall, ToolChoice, ToolSet, ToolSpec
    from moa_observability.tracing import tracer
    from tests.helpers import by_name, wait_for_spans

    tools = ToolSet(
        tools=(ToolSpec(name="get_weather", parameters={"type": "object"}),),
        choice=ToolChoice(mode="required"),
    )
    caller = ScriptedCaller(default="Paris is clear.")
    caller.script(AGG1, Reply(text="It is sunny."))
    caller.script(AGG2, Reply(text="", tool_calls=(ToolCall(id="c", name="get_weather", arguments="{}"),)))
    with tracer().start_as_current_span("client request") as root:
        await engine(caller).run(QUESTION, plan=plan(tools="aggregate"), tools=tools)
    spans = wait_for_spans(otlp, format(root.get_span_context().trace_id, "032x"), {"moa.run", "moa.fuse"})
    (fuse,) = by_name(spans, "moa.fuse")
    assert [e["name"] for e in fuse["events"] if e["name"].endswith(".rejected")] == ["moa.tools.rejected"]
