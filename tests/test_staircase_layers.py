"""Staircase aggregation through a two-layer plan, driven by ``ScriptedCaller``.

Layer 1's proposers write their answers in three 20-character pieces and pause between them on
the caller's virtual clock (``Reply.pauses``): the first piece at step 0, the second at step 1,
the last at step 2. Nothing of layer 1 can finish before the test moves the clock to step 2, so
whatever happened before that happened while layer 1 was still writing: every claim here is an
order of events, never a time. ``GUARD_S`` only turns a hang (the engine waiting for layer 1
where it should not) into a failure; no assertion depends on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from moa import MoAEngine, MoAResult, Plan, load_config
from moa.caps import worst_case_calls
from moa.config import MoAConfig
from moa.engine.cost import projected_cost
from moa.errors import FallbackReason, OverCap
from moa.result import CallRecord, Progress, Stage
from moa.testing import Reply, ScriptedCall, ScriptedCaller
from moa.types import ChatMessage, ErrorKind, GenerationParams, TextDelta

QUESTION = [ChatMessage(role="user", content="How do vaccines train the immune system?")]
P = ("p/one", "p/two", "p/three")  # layer 1
Q = ("q/one", "q/two", "q/three")  # layer 2
AGG, FB = "a/first", "f/fallback"
CHUNK = 20
LONG_S = 600.0
GUARD_S = 30.0

Event = TextDelta | MoAResult | Progress


def piece(tag: str) -> str:
    """One chunk of exactly ``CHUNK`` characters that says where it came from."""
    return f"<{tag}>".ljust(CHUNK, ".")


def spec(key: str) -> dict[str, str]:
    provider, model = key.split("/")
    return {"provider": provider, "model": model}


def two_layers(**update: object) -> Plan:
    """Two layers of three proposers (quorum 2), one aggregator, one fallback; staircase with two
    intermediate steps of ``CHUNK`` characters."""
    raw: dict[str, object] = {
        "layers": [
            {"proposers": [spec(k) for k in P], "quorum": 2},
            {"proposers": [spec(k) for k in Q], "quorum": 2},
        ],
        "aggregators": [spec(AGG)],
        "fallbacks": [spec(FB)],
        "aggregation": "staircase",
        "staircase_chunk_chars": CHUNK,
        "staircase_steps": 2,
        "staircase_step_tokens": 8,
        "grace_s": LONG_S,
        "layer_deadline_s": LONG_S,
        "call_timeout_s": LONG_S,
    }
    raw.update(update)
    return Plan.model_validate(raw)


def scripted() -> ScriptedCaller:
    """Layer 1 writes piece A at step 0, B at step 1, C at step 2; every later call answers at once."""
    caller = ScriptedCaller(default=None)
    for key in P:
        name = key.split("/")[1]
        pieces = tuple(piece(f"{name}-{part}") for part in "ABC")
        caller.script(key, Reply(deltas=pieces, pauses=((1, 1), (2, 2))))
    for key in Q:
        name = key.split("/")[1]
        caller.script(key, *(Reply(deltas=(piece(f"q{name}-{n}"),)) for n in ("s1", "s2", "end")))
    caller.script(AGG, *(Reply(deltas=(piece(f"agg-{n}"),)) for n in ("s1", "s2", "end")))
    caller.script(FB, "a single model's answer")
    return caller


def engine(caller: ScriptedCaller, config: MoAConfig | None = None) -> MoAEngine:
    return MoAEngine(config or load_config(None), caller)


async def next_text(events: AsyncIterator[Event]) -> TextDelta:
    """The stream's next text delta (progress events before it are skipped)."""
    async with asyncio.timeout(GUARD_S):
        async for ev in events:
            if isinstance(ev, TextDelta):
                return ev
    raise AssertionError("the stream ended without text")


async def drain(events: AsyncIterator[Event]) -> tuple[str, MoAResult]:
    text, result = "", None
    async with asyncio.timeout(GUARD_S):
        async for ev in events:
            if isinstance(ev, TextDelta):
                text += ev.text
            elif isinstance(ev, MoAResult):
                result = ev
    assert result is not None
    return text, result


def calls_of(caller: ScriptedCaller, keys: tuple[str, ...]) -> list[ScriptedCall]:
    return [c for c in caller.calls if c.key in keys]


def prompt(call: ScriptedCall) -> str:
    return "\n".join(m.content for m in call.request.messages)


def steps_of(result: MoAResult, key: str) -> list[CallRecord]:
    return [c for c in result.calls if f"{c.provider}/{c.model}" == key]


@dataclass(frozen=True)
class AtFirstToken:
    """What was true when the client's first token arrived."""

    text: str
    step: int  # the virtual clock
    layer1_finished: list[bool]
    layer2_started: list[tuple[str, int]]  # (model, the clock when the call started)


async def run_through(caller: ScriptedCaller, by_step_one: int = 11) -> tuple[AtFirstToken, str, MoAResult]:
    """Run the two-layer staircase, moving the clock only once the engine did what it can
    (``by_step_one``: the calls started by then).

    Returns what was true when the client's first token arrived, the whole text, and the result.
    """
    events = engine(caller).stream(QUESTION, plan=two_layers())
    first = await next_text(events)
    at_first = AtFirstToken(
        text=first.text,
        step=caller.step,
        layer1_finished=[c.finished for c in calls_of(caller, P)],
        layer2_started=[(c.key, c.started_step) for c in calls_of(caller, Q)],
    )
    async with asyncio.timeout(GUARD_S):
        await caller.advance()  # layer 1 writes its second pieces
        # 3 + 3 first steps + 1 aggregator step, then 3 second steps + 1 aggregator step.
        await caller.wait_started(by_step_one)
    await caller.advance()  # layer 1 finishes
    text, result = await drain(events)
    return at_first, first.text + text, result


async def test_layer_two_starts_stepping_before_layer_one_finished() -> None:
    """(1) Every layer-2 proposer's first step call starts at step 0, while every layer-1
    proposer is still writing (they cannot finish before step 2)."""
    caller = scripted()
    at_first, _, result = await run_through(caller)
    assert at_first.layer1_finished == [False, False, False]
    assert sorted(at_first.layer2_started) == sorted((k, 0) for k in Q)
    layer1 = calls_of(caller, P)
    assert all(c.finished and c.result is not None and c.result.ok for c in layer1)
    first_steps = [steps_of(result, k)[0] for k in Q]
    assert all(r.stage is Stage.PROPOSER and r.layer == 2 and r.staircase_step == 1 for r in first_steps)


async def test_the_first_token_arrives_while_layer_one_still_writes() -> None:
    """(2) The client's first token is the aggregator's first step, written at step 0: before
    any layer-1 proposer finished, from layer 2's first steps."""
    caller = scripted()
    at_first, text, result = await run_through(caller)
    assert at_first.step == 0 and at_first.layer1_finished == [False, False, False]
    assert at_first.text == piece("agg-s1")
    assert text == piece("agg-s1") + piece("agg-s2") + piece("agg-end")
    aggregator = [(r.staircase_step, r.ok) for r in steps_of(result, AGG)]
    assert aggregator == [(1, True), (2, True), (None, True)]
    assert result.fallback is None and (result.provider, result.model) == ("a", "first")


async def test_a_step_shorter_than_a_chunk_is_a_boundary_for_the_stage_after() -> None:
    """(2) Layer 2's steps write 8 characters, less than a chunk: the aggregator's step k starts as
    soon as layer 2's quorum wrote its step k, and reads exactly those steps. With chunks alone it
    would wait for layer 2's third step, and that for layer 1 to finish."""
    caller = scripted()
    for key in Q:
        name = key.split("/")[1]
        short = (f"{name}-1".ljust(8, "."), f"{name}-2".ljust(8, "."), piece(f"q{name}-end"))
        caller.script(key, *(Reply(deltas=(d,)) for d in short))
    at_first, _, result = await run_through(caller)
    assert at_first.step == 0 and at_first.layer1_finished == [False, False, False]
    assert at_first.text == piece("agg-s1")
    s1, s2, _ = (prompt(c) for c in caller.calls_to(AGG))
    for key in Q:
        name = key.split("/")[1]
        one, two = f"{name}-1".ljust(8, "."), f"{name}-2".ljust(8, ".")
        assert one in s1 and two not in s1
        assert one + two in s2
    aggregator = [(r.staircase_step, r.ok) for r in steps_of(result, AGG)]
    assert aggregator == [(1, True), (2, True), (None, True)]


async def test_a_step_reads_an_answer_that_finished_whole() -> None:
    """(3) p/one writes its whole answer at step 0: layer 2's second steps (at step 1, long after
    it finished) read it whole, not cut at their boundary, beside the others' first two pieces."""
    caller = scripted()
    caller.script(P[0], Reply(deltas=tuple(piece(f"one-{part}") for part in "ABC")))
    await run_through(caller)
    whole = piece("one-A") + piece("one-B") + piece("one-C")
    for key in Q:
        s2 = prompt(caller.calls_to(key)[1])
        assert whole in s2
        assert piece("two-A") + piece("two-B") in s2 and piece("two-C") not in s2


async def test_each_layer_two_step_sees_growing_prefixes_and_the_last_the_whole_answers() -> None:
    """(3) A layer-2 proposer's step 1 reads layer 1's first pieces only, step 2 the first two, the
    last step the whole answers; each continues its own answer so far."""
    caller = scripted()
    _, _, result = await run_through(caller)
    templates = load_config(None).templates
    for key in Q:
        name = key.split("/")[1]
        s1, s2, last = (prompt(c) for c in caller.calls_to(key))
        for p in P:
            a, b, c = (piece(f"{p.split('/')[1]}-{part}") for part in "ABC")
            assert a in s1 and b not in s1 and c not in s1
            assert a + b in s2 and c not in s2
            assert a + b + c in last
        # Its own answer so far, to continue (these providers take no prefill: an instruction).
        assert piece(f"q{name}-s1") not in s1
        assert piece(f"q{name}-s1") in s2 and templates.continue_user in s2
        assert piece(f"q{name}-s1") + piece(f"q{name}-s2") in last
        records = steps_of(result, key)
        assert [(r.staircase_step, r.layer, r.ok) for r in records] == [
            (1, 2, True),
            (2, 2, True),
            (None, 2, True),
        ]
        assert [r.continued_after_chars for r in records] == [None, CHUNK, 2 * CHUNK]
    # The aggregator's last step read layer 2's whole answers.
    *_, agg_last = caller.calls_to(AGG)
    assert all(piece(f"q{k.split('/')[1]}-end") in prompt(agg_last) for k in Q)


async def test_a_layer_two_proposer_whose_step_fails_is_a_failed_proposer() -> None:
    """(4) q/three fails its first step: it makes no other call and counts as layer 2's failed
    proposer; the quorum of two is still met by the other two, whose answers alone are fused."""
    caller = scripted()
    caller.script(Q[2], Reply(error=ErrorKind.SERVER_ERROR))
    _, _, result = await run_through(caller, by_step_one=10)  # q/three takes no second step
    assert len(caller.calls_to(Q[2])) == 1
    (failed,) = steps_of(result, Q[2])
    assert (failed.stage, failed.layer, failed.staircase_step) == (Stage.PROPOSER, 2, 1)
    assert (failed.ok, failed.error_kind) == (False, ErrorKind.SERVER_ERROR)
    assert result.fallback is None and (result.provider, result.model) == ("a", "first")
    *_, agg_last = caller.calls_to(AGG)
    assert piece("qone-end") in prompt(agg_last) and piece("qtwo-end") in prompt(agg_last)
    assert "qthree" not in prompt(agg_last)


async def test_a_layer_two_out_of_quorum_falls_back_without_waiting_for_layer_one() -> None:
    """(4) Two of layer 2's proposers fail their first step: its quorum of two is out of reach, so
    the run falls back at once (clock still at step 0), cancelling layer 1 and q/one."""
    caller = scripted()
    for key in Q[1:]:
        caller.script(key, Reply(error=ErrorKind.RATE_LIMITED))
    _, result = await drain(engine(caller).stream(QUESTION, plan=two_layers()))
    assert caller.step == 0
    assert result.fallback_reason is FallbackReason.QUORUM_MISSED and result.text == "a single model's answer"
    assert "layer 2 missed its quorum" in (result.fallback or "")
    assert sorted(caller.cancelled) == sorted(P)
    assert not caller.calls_to(AGG)
    failed = [r for r in result.calls if r.layer == 2 and not r.ok and not r.cancelled_straggler]
    assert sorted(f"{r.provider}/{r.model}" for r in failed) == sorted(Q[1:])
    assert all(r.staircase_step == 1 for r in failed)


async def test_leaving_mid_staircase_cancels_every_call_in_flight() -> None:
    """A client that leaves after the first token (its request's task is cancelled, as the server
    does on a disconnect): layer 1's streams, still writing, are cut, and so is every other call
    in flight."""
    caller = scripted()
    first = asyncio.Event()

    async def client() -> None:
        async for ev in engine(caller).stream(QUESTION, plan=two_layers()):
            if isinstance(ev, TextDelta):
                first.set()

    task = asyncio.create_task(client())
    async with asyncio.timeout(GUARD_S):
        await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(P) <= set(caller.cancelled)
    assert sorted(caller.cancelled) == sorted(c.key for c in caller.calls if not c.finished)


async def test_the_steps_of_later_layers_count_in_max_calls_and_are_refused_up_front() -> None:
    """(5) Each of the two steps calls the aggregator and the three layer-2 proposers once more; a
    cap one under that worst case refuses the plan before any model is called."""
    stair, final = two_layers(), two_layers(aggregation="final")
    assert worst_case_calls(final) == 3 + 3 + 1 + 1
    assert worst_case_calls(stair) == worst_case_calls(final) + 2 * (1 + 3)
    cfg = load_config(None)
    tight = cfg.model_copy(
        update={"caps": cfg.caps.model_copy(update={"max_calls": worst_case_calls(stair) - 1})}
    )
    caller = scripted()
    with pytest.raises(OverCap, match=r"caps\.max_calls"):
        await drain(engine(caller, tight).stream(QUESTION, plan=stair))
    assert caller.calls == []
    assert worst_case_calls(stair) <= cfg.caps.max_calls  # the default cap leaves room for it
    # docs/CONFIGURATION.md: moa's worst case goes from 10 calls to 25 (3 steps of 2 aggregators
    # and 3 proposers).
    moa = cfg.presets["moa"]
    assert worst_case_calls(moa) == 10
    assert worst_case_calls(moa.model_copy(update={"aggregation": "staircase"})) == 25 <= cfg.caps.max_calls


def test_the_steps_of_later_layers_count_in_the_projected_cost() -> None:
    """The staircase surcharge of ``moa`` (two layers) exceeds that of its last layer alone: the
    second layer's steps are priced too, not only the aggregator's."""
    cfg = load_config(None)
    moa = cfg.presets["moa"]
    alone = moa.model_copy(update={"layers": moa.layers[1:]})
    params = GenerationParams(max_tokens=200)

    def surcharge(plan: Plan) -> float:
        stair = plan.model_copy(update={"aggregation": "staircase"})
        return projected_cost(cfg, stair, QUESTION, params) - projected_cost(cfg, plan, QUESTION, params)

    assert surcharge(alone) > 0
    assert surcharge(moa) > surcharge(alone)


async def test_three_layers_step_each_over_the_one_before() -> None:
    """Layer 3 steps over layer 2's stepped answers as layer 2 steps over layer 1's: the mechanism
    is the same at every depth, and each last step finishes from the whole answers before it."""
    caller = scripted()
    for key in ("r/one", "r/two"):
        caller.script(key, *(Reply(deltas=(piece(f"{key}-{n}"),)) for n in ("s1", "s2", "end")))
    raw = two_layers().model_dump(mode="json")
    raw["layers"].append({"proposers": [spec("r/one"), spec("r/two")], "quorum": 2})
    events = engine(caller).stream(QUESTION, plan=Plan.model_validate(raw))
    await next_text(events)
    # Layer 3's first steps came before layer 1 wrote its second pieces.
    assert caller.step == 0 and len(caller.calls_to("r/one")) >= 1
    async with asyncio.timeout(GUARD_S):
        await caller.advance(2)
    text, result = await drain(events)
    for key in ("r/one", "r/two"):
        records = steps_of(result, key)
        assert [r.layer for r in records] == [3] * len(records) and records[-1].staircase_step is None
        assert all(r.ok for r in records) and len(records) >= 2
        *_, last = caller.calls_to(key)
        # Each layer-2 answer whole: everything its calls wrote, in order.
        assert all("".join(c.reply.answer for c in caller.calls_to(k)) in prompt(last) for k in Q)
    assert result.fallback is None and text.endswith(piece("agg-end"))


async def test_the_worst_case_is_the_calls_a_full_staircase_run_makes() -> None:
    """``worst_case_calls`` against a run where every step happens (layer 1 writes until the
    clock's step 2): the calls made, by model, are the worst case but for the fallback, which
    cannot run once the staircase's text is out. A formula that missed the layer-2 proposers'
    steps (or counted the aggregator's once) would disagree with what was called."""
    caller = scripted()
    _, _, result = await run_through(caller)
    plan = two_layers()
    made = {key: len(calls_of(caller, (key,))) for key in (*P, *Q, AGG, FB)}
    steps = plan.staircase_steps
    assert made == {**dict.fromkeys(P, 1), **dict.fromkeys(Q, steps + 1), AGG: steps + 1, FB: 0}
    assert sum(made.values()) == len(result.calls) == worst_case_calls(plan) - len(plan.fallbacks)
