"""Several answers (``n``) in the engine alone, on ``ScriptedCaller``'s virtual clock: what
happens to the other answers when one fails. The API-level behaviour is in test_api_choices.py."""

from __future__ import annotations

import asyncio

import pytest

from moa import MoAEngine
from moa.errors import AllProvidersFailed, InvalidRequest
from moa.result import CallRecord, Stage
from moa.testing import Reply, ScriptedCaller
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import ErrorKind
from tests.test_ledger import AGG, CONFIG, MARGIN, P1, P2, P3, QUESTION, WORDS, plan, price

FALLBACK = "gemini/gemini-2.5-pro"


async def test_an_answer_that_fails_cuts_the_others_and_every_call_is_billed() -> None:
    """Two answers: one aggregator call writes 5 pieces and holds; the other then fails, and the
    plan may not answer otherwise. The request fails with the usual error; the held answer is
    cancelled and recorded at its prompt plus the pieces it sent, under its ``choice``."""
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text=f"the answer of {key}"))
    caller.script(
        AGG,
        Reply(deltas=WORDS, pauses=((5, 99),)),
        Reply(error=ErrorKind.BAD_REQUEST, at_step=1),
    )
    seen: list[CallRecord] = []
    failing = plan(on_aggregators_failed="fail")
    engine = MoAEngine(CONFIG, caller)
    run = asyncio.create_task(engine.run(QUESTION, plan=failing, on_call=seen.append, choices=2))
    await caller.wait_started(5)
    for _ in range(40):  # the first aggregator sends its pieces up to its pause
        await asyncio.sleep(0)
    await caller.advance()
    with pytest.raises(AllProvidersFailed):
        await run
    finals = [r for r in seen if r.stage is Stage.AGGREGATOR]
    assert sorted(r.choice for r in finals if r.choice is not None) == [0, 1]
    # Both answers read the same references.
    prompts = {approx_message_tokens(m.content for m in c.request.messages) for c in caller.calls_to(AGG)}
    assert len(prompts) == 1
    (cut,) = [r for r in finals if r.error_kind is ErrorKind.CANCELLED]
    (failed,) = [r for r in finals if r.error_kind is ErrorKind.BAD_REQUEST]
    assert cut.choice != failed.choice
    assert cut.usage_estimated and cut.usage.input_tokens == prompts.pop() > 0
    assert cut.usage.output_tokens == approx_tokens("".join(WORDS[:5])) + MARGIN
    assert cut.cost_usd == pytest.approx(price(AGG, cut.usage.input_tokens, cut.usage.output_tokens))
    assert cut.cost_usd > 0
    assert len([r for r in seen if r.stage is Stage.PROPOSER and r.ok]) == 3


async def test_each_answer_turns_to_the_fallback_chain_on_its_own() -> None:
    """Every aggregator call fails: each answer then asks the fallback chain afresh, one call each."""
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text=f"the answer of {key}"))
    caller.fail(AGG, ErrorKind.BAD_REQUEST)
    caller.script(FALLBACK, "first fallback answer", "second fallback answer")
    fallbacks = [{"provider": "gemini", "model": "gemini-2.5-pro"}]
    result = await MoAEngine(CONFIG, caller).run(QUESTION, plan=plan(fallbacks=fallbacks), choices=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert {c.answer_source for c in result.choices} == {"fallback"}
    assert sorted(c.text for c in result.choices) == ["first fallback answer", "second fallback answer"]
    assert len(caller.calls_to(AGG)) == 2 and len(caller.calls_to(FALLBACK)) == 2
    assert sorted(r.choice for r in result.calls if r.stage is Stage.FALLBACK) == [0, 1]


async def test_each_answer_may_be_salvaged_from_the_best_proposal() -> None:
    """No fallback, every aggregator call fails, the plan allows a proposal: each answer is the
    best proposal (the same one), marked as such."""
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text=f"the answer of {key}"))
    caller.fail(AGG, ErrorKind.BAD_REQUEST)
    salvaging = plan(on_aggregators_failed="proposal")
    result = await MoAEngine(CONFIG, caller).run(QUESTION, plan=salvaging, choices=2)
    assert [c.answer_source for c in result.choices] == ["proposal", "proposal"]
    assert [c.text for c in result.choices] == [f"the answer of {P1}"] * 2
    assert len(caller.calls_to(AGG)) == 2


@pytest.mark.parametrize("choices", [0, -1, 5])
async def test_the_engine_holds_its_callers_to_one_to_max_n_answers(choices: int) -> None:
    caller = ScriptedCaller()
    with pytest.raises(InvalidRequest) as refused:
        await MoAEngine(CONFIG, caller).run(QUESTION, plan=plan(), choices=choices)
    assert refused.value.param == "n" and not caller.calls
