"""``moa bench --compare``: the baseline script making the calls a preset makes, and the report
pairing the two sides' calls role by role (output tokens) and their end-to-end p50s."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from moa.benchmark import runner
from moa.benchmark.baseline import Baseline
from moa.benchmark.compare import (
    PresetBaseline,
    compare_tables,
    compared_preset,
    e2e_row,
    layered_plan,
    pairs,
    role_rows,
    unpaired,
)
from moa.benchmark.options import BenchOptions
from moa.benchmark.runner import HttpTarget
from moa.config import ConfigError, MoAConfig
from moa.simulator.server import SimulatorServer
from tests.helpers import ApiServer

QUESTION = "How does a compiler work?"


def _call(stage: str, model: str, out: int, layer: int | None = 1, inp: int = 10) -> dict[str, Any]:
    return {
        "stage": stage,
        "layer": layer if stage == "proposer" else None,
        "provider": "p",
        "model": model,
        "input_tokens": inp,
        "output_tokens": out,
    }


def _req(prompt: str, e2e_s: float, *calls: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, "e2e_s": e2e_s, "calls": list(calls)}


def test_calls_pair_by_prompt_and_role_in_the_order_they_came() -> None:
    """The same prompt asked twice is paired first with first; within a request, a role's calls
    in order (an aggregator retried down its chain); a call with no partner is counted apart."""
    service = [
        _req("b", 1.0, _call("proposer", "m", 100), _call("aggregator", "a", 300)),
        _req(
            "a", 1.0, _call("proposer", "m", 50), _call("aggregator", "a", 7), _call("aggregator", "a", 200)
        ),
        _req("a", 1.0, _call("proposer", "m", 60), _call("proposer", "m", 61, layer=2)),
    ]
    baseline = [
        _req("a", 1.0, _call("proposer", "m", 51), _call("aggregator", "a", 8)),
        _req("a", 1.0, _call("proposer", "m", 60), _call("proposer", "m", 61, layer=2)),
        _req("b", 1.0, _call("proposer", "m", 100), _call("aggregator", "a", 300)),
    ]
    got = [(o["output_tokens"], t["output_tokens"]) for o, t in pairs(service, baseline)]
    assert got == [(100, 100), (300, 300), (50, 51), (7, 8), (60, 60), (61, 61)]
    assert unpaired(service, baseline) == 1  # the service's second aggregator call of "a"
    assert unpaired(service, baseline[:2]) == 3  # "b" asked of the service alone


def test_each_roles_output_difference_and_its_largest_single_call() -> None:
    """Per role: each side's mean tokens per call, the difference of the sums (signed, the
    service's against the baseline's) and the largest relative difference of one call."""
    service = [
        _req("a", 1.0, _call("proposer", "m", 102, inp=12), _call("aggregator", "x", 300)),
        _req("b", 2.0, _call("proposer", "m", 90, inp=12), _call("aggregator", "x", 300)),
    ]
    baseline = [
        _req("a", 1.0, _call("proposer", "m", 100), _call("aggregator", "x", 300)),
        _req("b", 1.9, _call("proposer", "m", 100), _call("aggregator", "x", 294)),
    ]
    proposer, aggregator = role_rows(service, baseline)
    assert proposer["role"] == "proposer 1: p/m" and aggregator["role"] == "aggregator: p/x"
    assert proposer["calls"] == 2 and proposer["service_input_tokens"] == 12
    assert proposer["baseline_input_tokens"] == 10
    assert proposer["service_output_tokens"] == 96 and proposer["baseline_output_tokens"] == 100
    assert proposer["difference"] == pytest.approx(-0.04)
    assert proposer["largest_call_difference"] == pytest.approx(0.10)  # 90 against 100
    assert aggregator["difference"] == pytest.approx(6 / 594)
    assert aggregator["largest_call_difference"] == pytest.approx(6 / 294)
    row = e2e_row(service, baseline)
    assert (row["baseline_p50_ms"], row["service_p50_ms"]) == (1000, 1000)  # nearest rank of two
    assert e2e_row(service[1:], baseline[1:])["ratio"] == pytest.approx(2.0 / 1.9)


def test_the_report_holds_each_role_and_the_e2e_to_their_goals() -> None:
    """A role whose calls differ by more than 2% (in sum or in one call), or an e2e p50 more than
    3% off the baseline's, is marked as missing its goal."""
    service = [_req("a", 1.02, _call("proposer", "m", 101), _call("aggregator", "x", 310))]
    baseline = [_req("a", 1.0, _call("proposer", "m", 100), _call("aggregator", "x", 300))]
    block = {
        "preset": "moa-lite",
        "baseline": [{"concurrency": 1, "requests": baseline}],
        "services": [{"target": "local moa-lite", "concurrency": 1, "requests": service}],
    }
    levels = [
        {"target": "baseline", "concurrency": 1, "simulated_p50_ms": 950.0},
        {"target": "local moa-lite", "concurrency": 1, "simulated_p50_ms": 951.0},
    ]
    text = "\n".join(compare_tables(block, levels))
    assert "| proposer 1: p/m | 1 | 10.0 | 10.0 | 100.0 | 101.0 | +1.0% | 1.0% | yes |" in text
    assert "| aggregator: p/x | 1 | 10.0 | 10.0 | 300.0 | 310.0 | +3.3% | 3.3% | **no** |" in text
    assert "| local moa-lite | 1 | 950 | 951 | 1000 | 1020 | 1.020 | yes |" in text
    service[0]["e2e_s"] = 1.04
    assert "| local moa-lite | 1 | - | - | 1000 | 1040 | 1.040 | **no** |" in "\n".join(compare_tables(block))


def test_compare_needs_the_baseline_and_one_layered_preset(
    config: MoAConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert compared_preset(["baseline", "local:moa-lite", "serve:moa-lite"]) == "moa-lite"
    for targets in (["local:moa-lite"], ["baseline", "local:moa", "serve:moa-lite"], ["baseline", "floor"]):
        with pytest.raises(ConfigError, match="--compare needs the baseline and one model"):
            compared_preset(targets)
    assert layered_plan(config, "moa").layers
    with pytest.raises(ConfigError, match="needs a preset"):
        layered_plan(config, "openai/gpt-4.1-mini")
    with pytest.raises(ConfigError, match="mirrors layered presets"):
        layered_plan(config, "single")
    # Refused before anything starts: the mirror waits for every answer, then aggregates.
    early = BenchOptions(targets=["baseline", "local:moa-lite"], aggregation=["early"], compare=True)
    monkeypatch.setattr(runner, "Simulator", None)  # nothing may start
    with pytest.raises(ConfigError, match="mirrors the final aggregation"):
        asyncio.run(runner.run(early))


def test_the_baseline_makes_the_presets_calls_and_the_report_shows_they_matched(
    config: MoAConfig, sim: SimulatorServer
) -> None:
    """End to end on the in-process simulator: the service's `moa` (two layers with role prompts,
    the second reading the first's answers) and the script making its calls with the engine's
    prompt functions, over the official SDKs. Every call pairs with its partner and writes the
    same number of tokens from the same prompt, role by role."""
    prompts = ["How does a compiler work?"]
    kept: list[dict[str, Any]] = []

    async def both(url: str) -> tuple[list[Any], list[Any]]:
        base = Baseline(sim.url)
        mirror = PresetBaseline(base, config, "moa", kept)
        target = HttpTarget(url, "moa")
        target.calls = []
        try:
            theirs = [await mirror.ask(p) for p in prompts]
            ours = [await target.send(p) for p in prompts]
        finally:
            await base.aclose()
            await target.client.aclose()
        return theirs, [ours, target.calls]

    with ApiServer(config) as server:
        theirs, (ours, served) = asyncio.run(both(server.url))
    assert all(s.ok for s in theirs + ours)
    assert unpaired(served, kept) == 0 and len(pairs(served, kept)) == 7
    rows = role_rows(served, kept)
    assert [r["role"] for r in rows] == [
        "proposer 1: openai/gpt-4.1",
        "proposer 1: anthropic/claude-sonnet-4-6",
        "proposer 1: gemini/gemini-2.5-pro",
        "proposer 2: openai/gpt-4.1-mini",
        "proposer 2: anthropic/claude-haiku-4-5",
        "proposer 2: gemini/gemini-2.5-flash",
        "aggregator: anthropic/claude-sonnet-4-6",
    ]
    for r in rows:
        assert r["service_input_tokens"] == r["baseline_input_tokens"], r
        assert r["service_output_tokens"] == r["baseline_output_tokens"] > 0, r
        assert r["largest_call_difference"] == 0, r
    # The second layer read the first's answers on both sides (the same references).
    assert rows[3]["baseline_input_tokens"] > 5 * rows[0]["baseline_input_tokens"]
    block = {
        "preset": "moa",
        "baseline": [{"concurrency": 1, "requests": kept}],
        "services": [{"target": "local moa", "concurrency": 1, "requests": served}],
    }
    assert "| aggregator: anthropic/claude-sonnet-4-6 | 1 |" in "\n".join(compare_tables(block))


def _sent(sim: SimulatorServer) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """What the simulator was asked (model, parameters, prompt size) and wrote per model."""
    got = httpx.get(sim.url + "/admin/requests").json()["requests"]
    stats = httpx.get(sim.url + "/admin/stats").json()["models"]
    asked = sorted((r["model"], sorted(r["params"].items()), r["prompt_tokens"]) for r in got)
    return asked, {m: s["billed_output_tokens"] for m, s in stats.items()}


def test_moa_lites_calls_are_the_plain_scripts(config: MoAConfig, sim: SimulatorServer) -> None:
    """moa-lite asks its proposers the bare question (no role prompt, no parameter but the
    max_tokens Anthropic requires) and its aggregator with the template the plain baseline already
    shares: the preset's prompts make none of its calls longer than the naive script's."""
    seen = []
    for mirrored in (False, True):
        httpx.post(sim.url + "/admin/reset").raise_for_status()

        async def ask(mirrored: bool) -> bool:
            base = Baseline(sim.url)
            try:
                script = PresetBaseline(base, config, "moa-lite", None).ask if mirrored else base.ask
                return (await script(QUESTION)).ok
            finally:
                await base.aclose()

        assert asyncio.run(ask(mirrored))
        seen.append(_sent(sim))
    assert seen[0] == seen[1]
    asked, wrote = seen[0]
    assert len(asked) == 4 and all(n > 0 for n in wrote.values())
