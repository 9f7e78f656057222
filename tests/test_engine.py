"""The MoA engine end to end in-process: real SDKs, real HTTP, the simulator playing the providers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from moa.config import MoAConfig
from moa.engine.engine import MoAEngine
from moa.errors import AllProvidersFailed, DeadlineExceeded
from moa.plan import Plan
from moa.providers.registry import ProviderPool
from moa.result import MoAResult, Stage
from moa.simulator.server import SimulatorServer
from moa.types import ChatMessage, ErrorKind, HealthView, TextDelta
from tests.helpers import set_fault, set_pace, sim_stats, wait_idle
from tests.waiting import wait_until

QUESTION = [ChatMessage(role="user", content="How do vaccines train the immune system?")]


@pytest.fixture
async def pool(config: MoAConfig) -> AsyncIterator[ProviderPool]:
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as p:
        yield p


@pytest.fixture
def engine(config: MoAConfig, pool: ProviderPool) -> MoAEngine:
    return MoAEngine(config, pool)


def in_flight(sim: SimulatorServer) -> int:
    return sum(m["in_flight"] for m in sim_stats(sim).values())


def preset(config: MoAConfig, name: str, **update: Any) -> Plan:
    return config.presets[name].model_copy(update=update)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]


async def test_references_reach_the_aggregator(engine: MoAEngine, config: MoAConfig) -> None:
    result = await engine.run(QUESTION, preset="moa-lite")
    proposals = [c for c in result.calls if c.stage is Stage.PROPOSER]
    assert len(proposals) == 3 and all(c.ok for c in proposals)
    assert result.text.startswith("Synthesis of 3 references (merged: 1, 2, 3).")
    assert (result.provider, result.model) == ("openai", "gpt-4.1")
    # Totals add up over every call.
    assert result.usage.input_tokens == sum(c.usage.input_tokens for c in result.calls)
    assert result.cost_usd == pytest.approx(sum(c.cost_usd for c in result.calls))
    assert result.cost_usd > 0 and result.critical_path_s <= result.wall_time_s
    assert result.provider_critical_path_s is not None and result.provider_critical_path_s > 0


async def test_two_layers_feed_each_other(engine: MoAEngine, sim: SimulatorServer) -> None:
    result = await engine.run(QUESTION, preset="moa")
    layers = [c.layer for c in result.calls if c.stage is Stage.PROPOSER]
    assert layers == [1, 1, 1, 2, 2, 2]
    # Layer 2 proposers synthesised layer 1: their answers are fusions, so the aggregator's answer
    # (a fusion of fusions) says it merged three references.
    assert result.text.startswith("Synthesis of 3 references")
    assert result.decision.forced and result.preset == "moa"


async def test_quorum_and_grace_cancel_a_hanging_straggler(
    engine: MoAEngine, config: MoAConfig, sim: SimulatorServer
) -> None:
    # Gemini would answer, but only after 30 s, and the deadlines are further off still: a layer
    # that waited for it would record its answer; quorum + grace cancels it first.
    set_fault(sim, "gemini-2.5-flash", hang={"rate": 1.0, "hang_s": 30})
    plan = preset(config, "moa-lite", grace_s=0.2, layer_deadline_s=600, call_timeout_s=600)
    result = await engine.run(QUESTION, plan=plan)
    (straggler,) = [c for c in result.calls if c.cancelled_straggler]
    assert straggler.model == "gemini-2.5-flash" and straggler.error_kind is ErrorKind.CANCELLED
    assert straggler.error_message == "cancelled as a straggler: quorum met; grace period over"
    assert result.text.startswith("Synthesis of 2 references")
    s = await wait_idle(sim)
    assert s["gemini-2.5-flash"]["requests"] == s["gemini-2.5-flash"]["cancelled"] == 1
    assert s["gemini-2.5-flash"]["completed"] == 0


async def test_layer_deadline_bounds_the_wait_then_falls_back(
    engine: MoAEngine, config: MoAConfig, sim: SimulatorServer
) -> None:
    for model in ("claude-haiku-4-5", "gemini-2.5-flash"):
        set_fault(sim, model, hang={"rate": 1.0})
    plan = preset(config, "moa-lite", layer_deadline_s=0.6, grace_s=0.1)
    result = await engine.run(QUESTION, plan=plan)
    # The layer waited for its deadline (a lower bound only: how much later it ended is the
    # machine's business), then gave up on the two hanging calls.
    assert result.wall_time_s >= 0.6
    assert result.fallback == "layer 1 missed its quorum" and result.fallback_reason == "quorum_missed"
    assert (result.provider, result.model) == ("openai", "gpt-4.1")  # first of the fallback chain
    assert not result.text.startswith("Synthesis")  # a plain single-model answer
    stragglers = [c for c in result.calls if c.cancelled_straggler]
    assert sorted(c.model for c in stragglers) == ["claude-haiku-4-5", "gemini-2.5-flash"]
    assert {c.error_kind for c in stragglers} == {ErrorKind.TIMEOUT}
    assert {c.error_message for c in stragglers} == {"cancelled as a straggler: layer deadline passed"}
    s = await wait_idle(sim)
    assert s["claude-haiku-4-5"]["cancelled"] == s["gemini-2.5-flash"]["cancelled"] == 1


async def test_unreachable_quorum_fails_fast(
    engine: MoAEngine, config: MoAConfig, sim: SimulatorServer
) -> None:
    """Once too many proposers have failed for the quorum, the layer stops waiting for the rest.

    Two of three proposers fail at once (a broken body is not retried); the third would answer,
    but only after 30 s, and the deadlines are further off still. A layer that waited for it
    would record its answer; one that stops when the quorum is out of reach cancels it first.
    """
    for model in ("claude-haiku-4-5", "gemini-2.5-flash"):
        set_fault(sim, model, malformed_json={"rate": 1.0})
    set_fault(sim, "gpt-4.1-mini", hang={"rate": 1.0, "hang_s": 30})
    plan = preset(config, "moa-lite", layer_deadline_s=600, call_timeout_s=600, grace_s=600)
    result = await engine.run(QUESTION, plan=plan)
    assert result.fallback == "layer 1 missed its quorum" and result.fallback_reason == "quorum_missed"
    assert (result.provider, result.model) == ("openai", "gpt-4.1")
    proposers = {c.model: c for c in result.calls if c.stage is Stage.PROPOSER}
    failed = {m: c.error_kind for m, c in proposers.items() if not c.ok and not c.cancelled_straggler}
    assert failed == {
        "claude-haiku-4-5": ErrorKind.MALFORMED_RESPONSE,
        "gemini-2.5-flash": ErrorKind.MALFORMED_RESPONSE,
    }
    straggler = proposers["gpt-4.1-mini"]
    assert straggler.cancelled_straggler and straggler.error_kind is ErrorKind.CANCELLED
    assert straggler.error_message == "cancelled as a straggler: the quorum can no longer be reached"
    # The simulator saw the hanging request closed by the client, not answered.
    s = await wait_idle(sim)
    assert s["gpt-4.1-mini"]["requests"] == s["gpt-4.1-mini"]["cancelled"] == 1
    assert s["gpt-4.1-mini"]["completed"] == 0


async def test_aggregator_fallback_chain(engine: MoAEngine, sim: SimulatorServer) -> None:
    set_fault(sim, "gpt-4.1", error_500={"rate": 1.0})
    result = await engine.run(QUESTION, preset="moa-lite")
    aggs = [c for c in result.calls if c.stage is Stage.AGGREGATOR]
    assert [(c.model, c.ok) for c in aggs] == [("gpt-4.1", False), ("claude-sonnet-4-6", True)]
    assert result.model == "claude-sonnet-4-6" and result.text.startswith("Synthesis of 3 references")
    assert result.fallback is None and result.fallback_reason is None  # the chain's second answered


async def test_every_aggregator_failing_is_no_missed_quorum(engine: MoAEngine, sim: SimulatorServer) -> None:
    """The proposers met their quorum; the aggregators all failed and a fallback answered. For
    the metrics and the benchmark this is a fallback, not a quorum shortfall."""
    for model in ("gpt-4.1", "claude-sonnet-4-6"):
        set_fault(sim, model, error_500={"rate": 1.0})
    result = await engine.run(QUESTION, preset="moa-lite")
    assert (result.provider, result.model) == ("gemini", "gemini-2.5-pro")
    assert result.fallback == "every aggregator failed" and result.fallback_reason == "aggregators_failed"


async def test_a_run_that_missed_its_quorum_says_so_when_it_fails(
    engine: MoAEngine, sim: SimulatorServer
) -> None:
    set_fault(sim, "*", error_503={"rate": 1.0})
    with pytest.raises(AllProvidersFailed) as err:
        await engine.run(QUESTION, preset="moa-lite")
    assert err.value.fallback_reason == "quorum_missed"


async def test_every_failure_is_listed_when_all_fail(engine: MoAEngine, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_503={"rate": 1.0})
    with pytest.raises(AllProvidersFailed) as err:
        await engine.run(QUESTION, preset="moa-lite")
    message = str(err.value)
    failures = err.value.failures
    # Every failure is in the message, as provider/model (stage): kind.
    for f in failures:
        assert f"{f.provider}/{f.model} ({f.stage}): {f.kind}" in message
    # Each of the three proposers is listed once. Which ones failed on their own and which was
    # cancelled once the quorum of two was out of reach depends on who finished retrying first,
    # but at least two failures are the provider's, or the quorum would still have been in reach.
    proposers = {f.model: f.kind for f in failures if f.stage == "proposer layer 1"}
    assert set(proposers) == {"gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash"}
    assert len([f for f in failures if f.stage == "proposer layer 1"]) == 3
    assert list(proposers.values()).count(ErrorKind.SERVER_ERROR) >= 2
    assert set(proposers.values()) <= {ErrorKind.SERVER_ERROR, ErrorKind.CANCELLED}
    fallbacks = [(f.provider, f.model, f.kind) for f in failures if f.stage == "fallback"]
    assert fallbacks == [
        ("openai", "gpt-4.1", ErrorKind.SERVER_ERROR),
        ("gemini", "gemini-2.5-pro", ErrorKind.SERVER_ERROR),
    ]
    assert err.value.status_code == 502


async def test_refine_rounds_see_the_previous_synthesis(engine: MoAEngine) -> None:
    result = await engine.run(QUESTION, preset="refine")
    stages = [(c.stage, c.round) for c in result.calls]
    assert stages == [
        (Stage.PROPOSER, 1),
        (Stage.PROPOSER, 1),
        (Stage.PROPOSER, 1),
        (Stage.AGGREGATOR, 1),
        (Stage.PROPOSER, 2),
        (Stage.PROPOSER, 2),
        (Stage.PROPOSER, 2),
        (Stage.AGGREGATOR, None),
    ]
    assert result.text.startswith("Synthesis of 3 references")


async def test_self_moa_samples_one_model(engine: MoAEngine) -> None:
    result = await engine.run(QUESTION, preset="self-moa")
    samples = [c for c in result.calls if c.stage is Stage.PROPOSER]
    assert {c.model for c in samples} == {"gpt-4.1"} and len(samples) == 4
    assert result.text.startswith("Synthesis of 4 references (merged: 1, 2, 3, 4).")


async def test_single_and_direct_model(engine: MoAEngine) -> None:
    result = await engine.run(QUESTION, preset="single")
    assert len(result.calls) == 1 and result.calls[0].stage is Stage.AGGREGATOR
    direct = await engine.run(QUESTION, preset="anthropic/claude-haiku-4-5")
    assert direct.model == "claude-haiku-4-5" and direct.decision.reason == "direct model call"


async def test_streaming_yields_the_final_answer_incrementally(engine: MoAEngine) -> None:
    deltas: list[str] = []
    result: MoAResult | None = None
    stages: list[str] = []
    async for ev in engine.stream(QUESTION, preset="moa-lite"):
        if isinstance(ev, TextDelta):
            assert result is None
            deltas.append(ev.text)
        elif isinstance(ev, MoAResult):
            result = ev
        else:
            assert not deltas  # progress comes before the answer
            stages.append(ev.stage)
    assert stages[0] == "admitted" and stages[-1] == "aggregating" and "proposers" in stages
    assert result is not None and len(deltas) > 3
    assert "".join(deltas) == result.text
    final = result.calls[-1]
    assert final.stage is Stage.AGGREGATOR and final.ttft_s is not None


async def test_budget_trimming_is_noted(engine: MoAEngine, config: MoAConfig) -> None:
    plan = preset(config, "moa-lite", reference_budget_tokens=90)
    result = await engine.run(QUESTION, plan=plan)
    assert any("trimmed" in n for n in result.notes), result.notes
    assert "[...]" in result.text  # the aggregator saw the truncated references


async def test_cancelling_a_run_cancels_every_call(engine: MoAEngine, sim: SimulatorServer) -> None:
    set_fault(sim, "*", hang={"rate": 1.0})
    task = asyncio.create_task(engine.run(QUESTION, preset="moa-lite"))
    await wait_until(lambda: in_flight(sim), lambda n: n == 3, what="three proposers in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    s = await wait_idle(sim)
    assert {m: (v["requests"], v["cancelled"]) for m, v in s.items()} == {
        "gpt-4.1-mini": (1, 1),
        "claude-haiku-4-5": (1, 1),
        "gemini-2.5-flash": (1, 1),
    }


async def test_request_deadline(engine: MoAEngine, sim: SimulatorServer) -> None:
    set_fault(sim, "*", hang={"rate": 1.0})
    # Nothing ever answers and the preset's own deadlines are over a minute: only the request's
    # deadline can end this run, and it must take the hanging calls down with it.
    with pytest.raises(DeadlineExceeded):
        await engine.run(QUESTION, preset="moa-lite", deadline_s=0.5)
    s = await wait_idle(sim)
    assert sum(m["requests"] for m in s.values()) == sum(m["cancelled"] for m in s.values()) == 3


async def test_open_circuit_substitutes_a_healthy_model(config: MoAConfig, pool: ProviderPool) -> None:
    engine = MoAEngine(config, pool, health=lambda: HealthView(unavailable=frozenset({"gemini"})))
    result = await engine.run(QUESTION, preset="moa-lite")
    assert "gemini" not in {c.provider for c in result.calls}
    assert result.decision.substitutions and result.text.startswith("Synthesis of 3 references")


async def test_llm_classifier_is_used_and_cached(
    config: MoAConfig, pool: ProviderPool, sim: SimulatorServer
) -> None:
    router = config.router.model_dump() | {
        "classifier": "llm",
        "classifier_model": {"provider": "openai", "model": "gpt-4o-mini"},
    }
    cfg = config.model_copy(update={"router": type(config.router).model_validate(router)})
    engine = MoAEngine(cfg, pool)
    first = await engine.run(QUESTION, preset="auto")
    assert first.calls[0].stage is Stage.CLASSIFIER and "llm classifier" in first.decision.reason
    assert not first.decision.classifier_cached
    second = await engine.run(QUESTION, preset="auto")
    assert all(c.stage is not Stage.CLASSIFIER for c in second.calls)
    assert second.decision.classifier_cached  # what moa_cache_hits counts
    assert sim_stats(sim)["gpt-4o-mini"]["requests"] == 1


@pytest.mark.parametrize("mode", ["final", "early", "staircase"])
async def test_the_critical_path_never_exceeds_the_wall_time(
    engine: MoAEngine, sim: SimulatorServer, mode: str
) -> None:
    """Every aggregation mode, on the two-layer ``moa`` preset streamed at a pace where staircase
    steps run beside the layers: the critical path (the time the run waited on its calls) is
    within the wall time, and covers most of it. Summed stage by stage, a staircase run's steps
    were counted on top of the layers they ran beside (22.8 s of critical path in 15.3 s)."""
    set_pace(sim, ttft_s=0.05, tokens_per_s=600.0)
    result: MoAResult | None = None
    async for ev in engine.stream(QUESTION, preset="moa", aggregation=mode, params=None):
        if isinstance(ev, MoAResult):
            result = ev
    assert result is not None and result.plan.aggregation == mode
    if mode == "staircase":
        assert any(c.staircase_step is not None for c in result.calls)
    assert 0.5 * result.wall_time_s < result.critical_path_s <= result.wall_time_s
