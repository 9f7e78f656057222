"""The engine's decisions (quorum, grace, early stop, the fallback chain) with ``ScriptedCaller``.

Beside the end-to-end tests in test_engine.py (real SDKs over HTTP against the simulator), these
drive the engine through its one seam with scripted answers: which proposer answers when is set
by asyncio events and the caller's virtual steps, so each test states an order of events rather
than racing the machine's clock. No test here sleeps to prove anything.
"""

from __future__ import annotations

import asyncio

import pytest

from moa import MoAEngine, MoAResult, Plan, load_config
from moa.errors import AllProvidersFailed
from moa.result import Stage
from moa.testing import Reply, ScriptedCaller
from moa.types import ChatMessage, ErrorKind, TextDelta

QUESTION = [ChatMessage(role="user", content="How do vaccines train the immune system?")]
P1, P2, P3 = "p/one", "p/two", "p/three"
AGG1, AGG2 = "a/first", "a/second"
FB = "f/fallback"
# Far off: a test that depended on one of these passing would hang, not pass by luck.
LONG_S = 600.0


def plan(**update: object) -> Plan:
    """Three proposers with a quorum of two, two aggregators, one fallback model."""
    raw: dict[str, object] = {
        "layers": [
            {
                "proposers": [{"provider": k.split("/")[0], "model": k.split("/")[1]} for k in (P1, P2, P3)],
                "quorum": 2,
            }
        ],
        "aggregators": [{"provider": "a", "model": "first"}, {"provider": "a", "model": "second"}],
        "fallbacks": [{"provider": "f", "model": "fallback"}],
        "grace_s": LONG_S,
        "layer_deadline_s": LONG_S,
        "call_timeout_s": LONG_S,
    }
    raw.update(update)
    return Plan.model_validate(raw)


def engine(caller: ScriptedCaller) -> MoAEngine:
    return MoAEngine(load_config(None), caller)


def aggregator_prompt(caller: ScriptedCaller, key: str = AGG1) -> str:
    (call,) = caller.calls_to(key)
    return "\n".join(m.content for m in call.request.messages)


def proposer_records(result: MoAResult) -> dict[str, tuple[bool, ErrorKind | None, bool]]:
    return {
        f"{c.provider}/{c.model}": (c.ok, c.error_kind, c.cancelled_straggler)
        for c in result.calls
        if c.stage is Stage.PROPOSER
    }


async def test_grace_waits_for_a_late_proposer_after_the_quorum() -> None:
    """The quorum is met at step 2; with grace left, the layer still takes the third answer."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="answer one", at_step=1))
    caller.script(P2, Reply(text="answer two", at_step=2))
    caller.script(P3, Reply(text="answer three", at_step=3))
    caller.script(AGG1, "the synthesis")
    run = asyncio.create_task(engine(caller).run(QUESTION, plan=plan()))
    await caller.wait_started(3)
    await caller.advance(2)
    assert not run.done() and not caller.calls_to(AGG1)  # quorum met, grace still running
    await caller.advance()
    result = await run
    assert result.text == "the synthesis" and (result.provider, result.model) == ("a", "first")
    prompt = aggregator_prompt(caller)
    assert all(f"answer {n}" in prompt for n in ("one", "two", "three"))
    assert caller.cancelled == [] and result.stragglers_cancelled == 0
    assert result.fallback is None and result.fallback_reason is None


async def test_grace_over_cancels_the_straggler() -> None:
    """Grace of zero: once two answered, the held third is cancelled as a straggler."""
    caller = ScriptedCaller()
    held = caller.hold(P3, text="never sent")
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    assert not held.is_set() and caller.cancelled == [P3]
    assert proposer_records(result)[P3] == (False, ErrorKind.CANCELLED, True)
    (straggler,) = [c for c in result.calls if c.cancelled_straggler]
    assert straggler.error_message == "cancelled as a straggler: quorum met; grace period over"
    assert "never sent" not in aggregator_prompt(caller)


async def test_early_aggregation_skips_the_grace_period() -> None:
    """Early aggregation: a long grace is ignored, the straggler is cancelled at the quorum."""
    caller = ScriptedCaller()
    caller.hold(P3)
    result = await engine(caller).run(QUESTION, plan=plan(), aggregation="early")
    assert caller.cancelled == [P3]
    (straggler,) = [c for c in result.calls if c.cancelled_straggler]
    assert straggler.error_message == "cancelled as a straggler: quorum met; early aggregation"


async def test_unreachable_quorum_stops_the_layer_and_falls_back() -> None:
    """Two of three fail: the quorum of two is out of reach, so the held third is not waited for."""
    caller = ScriptedCaller()
    caller.fail(P1, ErrorKind.SERVER_ERROR)
    caller.fail(P2, ErrorKind.MALFORMED_RESPONSE)
    held = caller.hold(P3)
    caller.script(FB, "a single model's answer")
    result = await engine(caller).run(QUESTION, plan=plan())
    assert not held.is_set() and caller.cancelled == [P3]
    assert proposer_records(result) == {
        P1: (False, ErrorKind.SERVER_ERROR, False),
        P2: (False, ErrorKind.MALFORMED_RESPONSE, False),
        P3: (False, ErrorKind.CANCELLED, True),
    }
    (straggler,) = [c for c in result.calls if c.cancelled_straggler]
    assert straggler.error_message == "cancelled as a straggler: the quorum can no longer be reached"
    assert result.fallback == "layer 1 missed its quorum" and result.fallback_reason == "quorum_missed"
    assert (result.provider, result.model, result.text) == ("f", "fallback", "a single model's answer")
    assert not caller.calls_to(AGG1) and not caller.calls_to(AGG2)  # no aggregation without a quorum
    (fb,) = caller.calls_to(FB)
    assert fb.request.messages == tuple(QUESTION)  # the plain question, no references


@pytest.mark.parametrize("kind", [k for k in ErrorKind if k is not ErrorKind.CANCELLED])
async def test_every_error_kind_counts_as_a_failed_proposer(kind: ErrorKind) -> None:
    caller = ScriptedCaller()
    caller.fail(P1, kind)
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    assert proposer_records(result)[P1] == (False, kind, False)
    assert result.fallback is None and result.provider == "a"  # two of three still met the quorum


async def test_aggregator_chain_then_fallback_chain() -> None:
    """The first aggregator fails, the second answers; both failing turns to the fallback chain."""
    caller = ScriptedCaller()
    caller.fail(AGG1, ErrorKind.SERVER_ERROR)
    caller.script(AGG2, "second aggregator")
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    aggs = [(c.model, c.ok) for c in result.calls if c.stage is Stage.AGGREGATOR]
    assert aggs == [("first", False), ("second", True)]
    assert result.text == "second aggregator" and result.fallback is None

    caller = ScriptedCaller()
    caller.fail(AGG1, ErrorKind.SERVER_ERROR)
    caller.fail(AGG2, ErrorKind.RATE_LIMITED)
    caller.script(FB, "fallback answer")
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    assert (result.provider, result.model, result.text) == ("f", "fallback", "fallback answer")
    assert result.fallback == "every aggregator failed" and result.fallback_reason == "aggregators_failed"
    assert [c.stage for c in result.calls if not c.cancelled_straggler][-1] is Stage.FALLBACK


async def test_everything_failing_lists_every_failure() -> None:
    caller = ScriptedCaller(default=None)  # an unscripted model fails (BAD_REQUEST)
    caller.fail(P1, ErrorKind.SERVER_ERROR)
    caller.fail(P2, ErrorKind.TIMEOUT)
    caller.hold(P3)
    with pytest.raises(AllProvidersFailed) as err:
        await engine(caller).run(QUESTION, plan=plan())
    assert err.value.fallback_reason == "quorum_missed"
    kinds = {(f.model, f.kind) for f in err.value.failures}
    assert ("one", ErrorKind.SERVER_ERROR) in kinds and ("two", ErrorKind.TIMEOUT) in kinds
    assert ("fallback", ErrorKind.BAD_REQUEST) in kinds
    assert caller.cancelled == [P3]


async def test_streaming_sends_the_aggregators_deltas() -> None:
    caller = ScriptedCaller()
    caller.script(AGG1, Reply(deltas=("Vaccines ", "show the ", "immune system ", "a harmless copy.")))
    events = [ev async for ev in engine(caller).stream(QUESTION, plan=plan(grace_s=0))]
    deltas = [ev.text for ev in events if isinstance(ev, TextDelta)]
    assert deltas == ["Vaccines ", "show the ", "immune system ", "a harmless copy."]
    (result,) = [ev for ev in events if isinstance(ev, MoAResult)]
    assert result.text == "".join(deltas) and events[-1] is result
    (agg,) = caller.calls_to(AGG1)
    assert agg.streamed


async def test_cancelling_a_run_cancels_the_calls_in_flight() -> None:
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.hold(key)
    run = asyncio.create_task(engine(caller).run(QUESTION, plan=plan()))
    await caller.wait_started(3)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sorted(caller.cancelled) == sorted([P1, P2, P3])
    assert not any(c.finished for c in caller.calls)


async def test_a_stream_broken_mid_answer_is_continued_by_the_next_aggregator() -> None:
    caller = ScriptedCaller()
    caller.script(
        AGG1,
        Reply(deltas=("Vaccines ", "show the ", "never sent"), error=ErrorKind.SERVER_ERROR, fail_after=2),
    )
    caller.script(AGG2, Reply(deltas=("immune system ", "a harmless copy.")))
    events = [ev async for ev in engine(caller).stream(QUESTION, plan=plan(grace_s=0))]
    deltas = [ev.text for ev in events if isinstance(ev, TextDelta)]
    (result,) = [ev for ev in events if isinstance(ev, MoAResult)]
    assert "".join(deltas) == result.text == "Vaccines show the immune system a harmless copy."
    (second,) = [c for c in result.calls if c.stage is Stage.AGGREGATOR and c.model == "second"]
    assert second.took_over and second.continued_after_chars == len("Vaccines show the ")
    assert result.fallback is None  # text was out: the chain continued it, no fallback answered


async def test_the_double_answers_in_script_order_and_by_step() -> None:
    """The double itself: successive replies, the last repeated; steps release calls in order."""
    from moa.types import CallRequest

    caller = ScriptedCaller()
    caller.script("m", "first", Reply(text="second", at_step=1))
    req = CallRequest(provider="p", model="m", messages=tuple(QUESTION))
    assert (await caller.call(req)).text == "first"
    pending = [asyncio.create_task(caller.call(req)) for _ in range(2)]
    await caller.wait_started(3)
    assert not any(t.done() for t in pending) and caller.step == 0
    await caller.advance()
    assert [(await t).text for t in pending] == ["second", "second"]
    assert [c.started_step for c in caller.calls] == [0, 0, 0] and all(c.finished for c in caller.calls)
    failed = await ScriptedCaller().fail("m", ErrorKind.RATE_LIMITED).call(req)
    assert failed.error is not None and failed.error.kind is ErrorKind.RATE_LIMITED and not failed.ok


# -- nothing thrown away: every aggregator failing after the proposers answered ------------------


async def test_every_aggregator_failing_answers_with_the_best_proposal() -> None:
    """No fallback chain, both aggregators refuse: the proposals the run paid for answer instead of
    an error. The first complete answer in the layer's order wins (P1 was cut at its limit)."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="one, cut short", finish_reason="length"))
    caller.script(P2, "answer two")
    caller.script(P3, "answer three")
    caller.fail(AGG1, ErrorKind.BAD_REQUEST)
    caller.fail(AGG2, ErrorKind.SERVER_ERROR)
    result = await engine(caller).run(QUESTION, plan=plan(fallbacks=[]))
    assert (result.text, result.provider, result.model) == ("answer two", "p", "two")
    assert result.answer_source == "proposal" and result.fallback_reason == "aggregators_failed"
    assert result.fallback is not None and "best proposal (p/two)" in result.fallback
    assert len(caller.calls) == 5  # nothing more was called to get it


async def test_the_fallback_chain_answers_first_and_a_proposal_after_it_fails() -> None:
    """The default (fallbacks): the configured chain is tried first; only when it fails too does a
    proposal answer. With ``proposal`` the chain is never called; with ``fail`` the run fails."""
    caller = ScriptedCaller()
    caller.fail(AGG1, ErrorKind.BAD_REQUEST)
    caller.fail(AGG2, ErrorKind.BAD_REQUEST)
    caller.script(FB, "fallback answer")
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    assert (result.text, result.answer_source) == ("fallback answer", "fallback")

    caller.fail(FB, ErrorKind.SERVER_ERROR)
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0))
    assert result.answer_source == "proposal" and result.text == "ok"

    before = len(caller.calls_to(FB))
    result = await engine(caller).run(QUESTION, plan=plan(grace_s=0, on_aggregators_failed="proposal"))
    assert result.answer_source == "proposal" and len(caller.calls_to(FB)) == before

    with pytest.raises(AllProvidersFailed):
        await engine(caller).run(QUESTION, plan=plan(grace_s=0, on_aggregators_failed="fail"))


async def test_a_streamed_run_streams_the_proposal_it_answers_with() -> None:
    caller = ScriptedCaller()
    caller.script(P1, "the first proposal, in words")
    caller.fail(AGG1, ErrorKind.BAD_REQUEST)
    caller.fail(AGG2, ErrorKind.BAD_REQUEST)
    text, result = "", None
    async for ev in engine(caller).stream(QUESTION, plan=plan(fallbacks=[])):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, MoAResult):
            result = ev
    assert result is not None and result.answer_source == "proposal"
    assert text == result.text == "the first proposal, in words"


async def test_a_failed_refine_synthesis_answers_with_the_rounds_best_proposal() -> None:
    caller = ScriptedCaller()
    caller.fail(AGG1, ErrorKind.BAD_REQUEST)
    caller.fail(AGG2, ErrorKind.BAD_REQUEST)
    refine = plan(grace_s=0, fallbacks=[], mode="refine", rounds=2)
    result = await engine(caller).run(QUESTION, plan=refine)
    assert result.answer_source == "proposal" and result.fallback_reason == "synthesis_failed"


# -- honest errors ---------------------------------------------------------------------------------

OVERFLOW = "request (1346 tokens) exceeds the available context size (1024 tokens), try increasing it"


async def test_a_prompt_the_service_built_and_the_provider_refused_is_never_the_clients_400() -> None:
    """The aggregator refuses the prompt the run built around the references: the client's request
    was valid, so the run fails as an upstream failure (502), with the provider's own reason."""
    caller = ScriptedCaller()
    caller.fail(AGG1, ErrorKind.BAD_REQUEST, OVERFLOW)
    caller.fail(AGG2, ErrorKind.BAD_REQUEST, OVERFLOW)
    strict = plan(fallbacks=[], on_aggregators_failed="fail")
    with pytest.raises(AllProvidersFailed) as err:
        await engine(caller).run(QUESTION, plan=strict)
    assert (err.value.status_code, err.value.error_type) == (502, "upstream_error")
    assert f"a/first (aggregator): bad_request ({OVERFLOW})" in err.value.message


async def test_a_direct_call_refused_is_the_clients_400_named_as_direct() -> None:
    """A plan with no layers sends the client's own messages: the refusal is the client's 400, and
    the model is named as what it was, a direct call (not an aggregator)."""
    caller = ScriptedCaller()
    caller.fail("local/smollm2", ErrorKind.BAD_REQUEST, OVERFLOW)
    direct = Plan.model_validate({"aggregators": [{"provider": "local", "model": "smollm2"}]})
    with pytest.raises(AllProvidersFailed) as err:
        await engine(caller).run(QUESTION, plan=direct)
    assert err.value.status_code == 400
    assert err.value.message == f"every provider failed: local/smollm2 (direct): bad_request ({OVERFLOW})"
