"""moa eval: the statistics, the verdict parser, the simulator's scripted judge over the three
wires, and whole runs against the simulator whose judge has known biases (ground truth)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from google.genai import types as genai_types

from moa.cli import main
from moa.config import MoAConfig
from moa.eval.report import build_report, markdown, write_report
from moa.eval.runner import EvalSpec, Evaluation, save_spec
from moa.eval.shadow import PresetTally, ShadowEvaluator
from moa.eval.stats import (
    cohen_kappa,
    length_controlled_rate,
    logistic_fit,
    mean_ci,
    sigmoid,
    wilson_interval,
)
from moa.eval.verdict import PAIRWISE_FORMAT, Verdict, parse_pairwise, parse_rating
from moa.eval.workloads import Item
from moa.simulator.profile import JudgeProfile, ModelProfile
from moa.simulator.server import SimulatorServer
from moa.testing import ScriptedCaller
from moa.types import ChatMessage
from tests.conftest import FAST_PROFILE
from tests.helpers import ApiServer, by_name, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.test_simulator import gemini_client
from tests.waiting import wait_until_sync

TARGET, REFERENCE, JUDGE = "openai/gpt-4.1-mini", "anthropic/claude-haiku-4-5", "gemini/gemini-2.5-pro"
FAST = {"ttft_s": 0.01, "tokens_per_s": 5000.0, "jitter": 0.0}

# -- statistics ------------------------------------------------------------------------------------


def test_bootstrap_interval_covers_the_mean_and_narrows_with_data() -> None:
    rng = random.Random(1)
    small = mean_ci([rng.gauss(3.0, 1.0) for _ in range(20)])
    large = mean_ci([rng.gauss(3.0, 1.0) for _ in range(400)])
    for est in (small, large):
        assert est.low is not None and est.high is not None
        assert est.low < 3.0 < est.high
    assert (large.high - large.low) < (small.high - small.low) / 2  # type: ignore[operator]
    assert mean_ci([1.0]).low is None  # one item: no interval rather than a fake one


def test_logistic_fit_recovers_known_coefficients() -> None:
    rng = random.Random(2)
    xs = [rng.uniform(-2, 2) for _ in range(4000)]
    ys = [1.0 if rng.random() < sigmoid(0.7 + 1.5 * x) else 0.0 for x in xs]
    a, b = logistic_fit(xs, ys)
    assert a == pytest.approx(0.7, abs=0.15)
    assert b == pytest.approx(1.5, abs=0.2)


def test_length_control_reads_the_rate_at_equal_length() -> None:
    rng = random.Random(3)
    diffs = [rng.gauss(100, 150) for _ in range(3000)]  # the target is usually longer
    prefs = [1.0 if rng.random() < sigmoid(2.0 * (d / 150)) else 0.0 for d in diffs]
    raw = sum(prefs) / len(prefs)
    lc = length_controlled_rate(prefs, diffs)
    assert raw > 0.65  # the judge rewards length...
    assert lc == pytest.approx(0.5, abs=0.06)  # ...and at equal length the two are even


def test_cohen_kappa() -> None:
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.0)


# -- verdicts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Assistant A is clearer.\n\n[[A]]", Verdict.A),
        ("**Final verdict: [[B]]**", Verdict.B),
        ("They are equally good. [[C]]", Verdict.TIE),
        ('Output "[[A]]" if A is better... Having compared them, my verdict: [[ b ]]', Verdict.B),
        ("Final verdict: Assistant B", Verdict.B),
        ("The better response is A.", Verdict.A),
        ("I lean towards the first response.", None),
        ("", None),
    ],
)
def test_pairwise_verdicts_are_read_from_real_looking_output(text: str, verdict: Verdict | None) -> None:
    assert parse_pairwise(text) == verdict


JUDGE_CORPUS = json.loads((Path(__file__).parent / "fixtures" / "judge_verdicts.json").read_text("utf-8"))


def test_every_judge_output_in_the_corpus_is_read_right() -> None:
    """Real judges' replies (FastChat's GPT-4 MT-Bench judgments, AlpacaEval's GPT-4 Turbo
    annotator) and the failure modes met in use, each with the verdict it gives: every one is read
    as that verdict, and one with none as ``None``, never a guess."""
    cases = JUDGE_CORPUS["cases"]
    assert sum(c["source"] != "constructed" for c in cases) >= 50
    assert {c["source"] for c in cases} == set(JUDGE_CORPUS["sources"])
    wrong = [
        (c["id"], c["verdict"], parse_pairwise(c["text"]))
        for c in cases
        if parse_pairwise(c["text"]) != (None if c["verdict"] is None else Verdict(c["verdict"]))
    ]
    assert wrong == []
    # Every kind of verdict is in it, so a parser that always answers one thing cannot pass.
    assert {c["verdict"] for c in cases} == {"A", "B", "tie", None}


def test_a_format_instruction_quoted_back_is_not_a_verdict() -> None:
    """Issue 33: a weak judge repeated the format sentence and its last marker, ``[[C]]``, was
    read as a tie. The judge's own verdict after (or before) the quote counts, or none."""
    assert parse_pairwise(PAIRWISE_FORMAT) is None
    assert parse_pairwise(f"Reply with {PAIRWISE_FORMAT}.") is None
    assert parse_pairwise(f"Reply with {PAIRWISE_FORMAT}.\n\nB is right.\n\n[[B]]") is Verdict.B
    assert parse_pairwise(f"[[A]]\n\n(I was asked for {PAIRWISE_FORMAT}.)") is Verdict.A
    assert parse_pairwise("Final verdict: [[C]] for a tie.") is Verdict.TIE  # a real GPT-4 verdict


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Good answer.\n\nRating: [[7]]", 7.0),
        ("Rating: [[8.5]]", 8.5),
        ("**Rating:** [[ 9 ]]", 9.0),
        ("Score: 6/10", 6.0),
        ("Rating: [[11]]", None),
        ("I would give it a seven.", None),
    ],
)
def test_ratings_are_read_and_range_checked(text: str, score: float | None) -> None:
    assert parse_rating(text) == score


# -- the simulator's judge over every wire ---------------------------------------------------------


def set_profile(sim: SimulatorServer, models: dict[str, Any]) -> None:
    profile = FAST_PROFILE.model_copy(
        update={"models": {name: ModelProfile(**{**FAST, **spec}) for name, spec in models.items()}}
    )
    httpx.put(f"{sim.url}/admin/profile", json=profile.model_dump(mode="json")).raise_for_status()


def pairwise_prompt(first: str, second: str) -> str:
    from moa.config import DEFAULT_JUDGE_PAIRWISE

    return DEFAULT_JUDGE_PAIRWISE.format(question="Why is the sky blue?", answer_a=first, answer_b=second)


async def test_the_simulated_judge_knows_who_wrote_each_answer_on_all_three_wires(
    sim: SimulatorServer,
) -> None:
    judge = {"judge": JudgeProfile(favour="gpt-4.1-mini", favour_p=1.0)}
    set_profile(sim, {"gpt-4.1": judge, "claude-sonnet-4-6": judge, "gemini-2.5-pro": judge})
    oai = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="k", max_retries=0)
    q = [{"role": "user", "content": "Why is the sky blue?"}]
    mini = (await oai.chat.completions.create(model="gpt-4.1-mini", messages=q)).choices[0].message.content  # type: ignore[arg-type]
    other = (await oai.chat.completions.create(model="gpt-4o-mini", messages=q)).choices[0].message.content  # type: ignore[arg-type]
    assert mini and other
    ant = anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0)
    gem = gemini_client(sim.url)
    for first, second, expected in ((mini, other, "[[A]]"), (other, mini, "[[B]]")):
        prompt = pairwise_prompt(first, second)
        o = await oai.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": prompt}])
        a = await ant.messages.create(
            model="claude-sonnet-4-6", max_tokens=512, messages=[{"role": "user", "content": prompt}]
        )
        g = await gem.aio.models.generate_content(
            model="gemini-2.5-pro", contents=prompt, config=genai_types.GenerateContentConfig()
        )
        replies = [o.choices[0].message.content, a.content[0].text, g.text]  # type: ignore[union-attr]
        assert all(r is not None and r.rstrip().endswith(expected) for r in replies), replies


# -- whole runs against ground truth ---------------------------------------------------------------

TOPICS = (
    "solar panels",
    "sourdough bread",
    "vaccines",
    "compound interest",
    "plate tectonics",
    "jazz improvisation",
    "database indexes",
    "coral reefs",
    "electric cars",
    "sleep cycles",
    "black holes",
    "urban gardening",
)
ASPECTS = ("why it matters", "the common mistakes", "how to get started", "the trade-offs", "its history")
READERS = ("a curious beginner", "a busy manager", "a high-school student")


def workload(tmp_path: Path, n: int = 60, turns: bool = False) -> Path:
    path = tmp_path / "workload.jsonl"
    rows = []
    # Every question distinct (up to 12 x 5 x 3 = 180): the simulator answers and judges a
    # repeated question identically, so a repeat would count one draw twice and make the
    # intervals, which assume independent items, too narrow.
    assert n <= len(TOPICS) * len(ASPECTS) * len(READERS)
    for i in range(n):
        topic, aspect = TOPICS[i % len(TOPICS)], ASPECTS[(i // len(TOPICS)) % len(ASPECTS)]
        reader = READERS[i // (len(TOPICS) * len(ASPECTS))]
        q = f"Explain {aspect} of {topic} for {reader}."
        row: dict[str, Any] = {"id": i, "category": ["writing", "reasoning"][i % 2]}
        row.update({"turns": [q, "Now summarise that in two sentences."]} if turns else {"prompt": q})
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def spec(path: Path, **kw: Any) -> EvalSpec:
    base: dict[str, Any] = {
        "workload": str(path),
        "targets": [TARGET],
        "reference": REFERENCE,
        "judges": [JUDGE],
    }
    return EvalSpec(**{**base, **kw})


async def run(cfg: MoAConfig, s: EvalSpec, run_dir: Path, **kw: Any) -> tuple[Evaluation, dict[str, Any]]:
    save_spec(run_dir, s)
    ev = Evaluation(s, cfg, run_dir, concurrency=16, **kw)
    await ev.run()
    return ev, build_report(s, ev.files, ev.items, ev.budget.stopped)


async def test_recovers_the_judges_preference_within_its_interval(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    set_profile(sim, {"gemini-2.5-pro": {"judge": JudgeProfile(favour="gpt-4.1-mini", favour_p=0.8)}})
    _, report = await run(config, spec(workload(tmp_path)), tmp_path / "run")
    pw = report["targets"][TARGET]["pairwise"]
    assert pw["judgments"] == 120 and pw["unparseable"] == 0
    assert pw["win_rate"]["low"] <= 0.8 <= pw["win_rate"]["high"]
    assert pw["win_rate"]["low"] > 0.5  # and the harness sees that the target is better


async def test_judging_both_orders_cancels_position_bias(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    # No preference between the two models, but 70% of the time the answer shown first wins outright.
    set_profile(sim, {"gemini-2.5-pro": {"judge": JudgeProfile(position_bias=0.7)}})
    _, report = await run(config, spec(workload(tmp_path)), tmp_path / "run")
    pw = report["targets"][TARGET]["pairwise"]
    assert pw["first_shown_wins"] > 0.75  # the bias is there, and reported
    assert pw["win_rate_target_shown_first_only"] > 0.75  # one order alone would be fooled by it
    assert pw["win_rate"]["low"] <= 0.5 <= pw["win_rate"]["high"]  # both orders: even, as they are
    assert pw["order_consistency"] < 0.5


async def test_length_control_removes_the_judges_length_preference(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    # Equal quality, but the target writes longer answers and the judge prefers longer ones.
    set_profile(
        sim,
        {
            "gpt-4.1-mini": {"output_tokens": (100, 700)},
            "claude-haiku-4-5": {"output_tokens": (60, 400)},
            "gemini-2.5-pro": {"judge": JudgeProfile(length_bias=1.0)},
        },
    )
    _, report = await run(config, spec(workload(tmp_path, n=100)), tmp_path / "run")
    pw = report["targets"][TARGET]["pairwise"]
    raw, lc = pw["win_rate"], pw["lc_win_rate"]
    assert pw["mean_length_diff_tokens"] > 50
    assert raw["low"] > 0.5  # the raw rate rewards length
    assert lc["low"] <= 0.5 <= lc["high"]  # at equal length: even, as the two models are
    assert abs(lc["value"] - 0.5) < abs(raw["value"] - 0.5)


async def test_off_format_verdicts_are_retried_once_and_counted(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    set_profile(sim, {"gemini-2.5-pro": {"judge": JudgeProfile(off_format=0.3)}})
    ev, report = await run(config, spec(workload(tmp_path)), tmp_path / "run")
    pw = report["targets"][TARGET]["pairwise"]
    recs = list(ev.files.judgments.values())
    assert len(recs) == pw["judgments"] == 120
    assert pw["wins"] + pw["ties"] + pw["losses"] + pw["unparseable"] == 120  # none dropped
    assert 0 < pw["unparseable"] < pw["retried"]
    assert 0.15 * 120 < pw["retried"] < 0.45 * 120
    assert all(r["retried"] for r in recs if r["verdict"] is None)
    # judgments.jsonl keeps every reply of a retried judge; raw is always the last one.
    assert all(len(r["replies"]) == (2 if r["retried"] else 1) and r["raw"] == r["replies"][-1] for r in recs)
    # Every retry is one more call to the judge: what the simulator saw.
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"{sim.url}/admin/stats")).json()["models"]["gemini-2.5-pro"]
    assert stats["requests"] == 120 + pw["retried"]
    assert "unparseable (retried)" in markdown(report)


async def test_graded_multi_turn_scores_by_category_with_two_judges(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    scripted = JudgeProfile(scores={"gpt-4.1-mini": 8.0, "claude-*": 4.0}, score_noise=1)
    set_profile(sim, {"gemini-2.5-pro": {"judge": scripted}, "gpt-4.1": {"judge": scripted}})
    s = spec(
        workload(tmp_path, n=30, turns=True),
        mode="graded",
        targets=[TARGET, REFERENCE],
        reference=None,
        judges=[JUDGE, "openai/gpt-4.1"],
    )
    ev, report = await run(config, s, tmp_path / "run")
    assert all(len(r["answers"]) == 2 for r in ev.files.answers.values())  # both turns answered
    mine, theirs = report["targets"][TARGET]["graded"], report["targets"][REFERENCE]["graded"]
    assert mine["score"]["low"] <= 8.0 <= mine["score"]["high"]
    assert theirs["score"]["low"] <= 4.0 <= theirs["score"]["high"]
    assert set(mine["by_category"]) == {"writing", "reasoning"}
    assert report["judge_agreement"][0]["judges"] == [JUDGE, "openai/gpt-4.1"]
    (agreement,) = report["judge_agreement"]
    assert agreement["n"] == 60 and agreement["within_1_point"] > 0.5
    assert report["cost_usd"]["targets"] > 0 and report["cost_usd"]["judging"] > 0


async def test_max_cost_stops_before_overspending_and_resume_finishes_without_repeating(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    set_profile(sim, {})
    s = spec(workload(tmp_path, n=20))
    run_dir = tmp_path / "run"
    ev, report = await run(config, s, run_dir, max_cost_usd=0.01)
    assert report["stopped"] == "max_cost"
    assert report["cost_usd"]["total"] <= 0.01
    done_before = {k for k, r in ev.files.answers.items() if r["error"] is None}
    assert 0 < len(done_before) < 40
    ev2 = Evaluation(s, config, run_dir, concurrency=16)
    await ev2.run()
    report2 = build_report(s, ev2.files, ev2.items, ev2.budget.stopped)
    assert report2["stopped"] is None
    assert report2["targets"][TARGET]["pairwise"]["judgments"] == 40
    lines = [json.loads(x) for x in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 40  # each answer asked once over the two sessions
    assert Counter((r["target"], r["item"]) for r in lines).most_common(1)[0][1] == 1
    notes = write_report(report2, run_dir)
    assert notes == [] and (run_dir / "report.png").stat().st_size > 1000


async def test_targets_on_a_running_service_and_another_openai_compatible_endpoint(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    set_profile(sim, {})
    endpoint = f"gpt-4.1-mini@{sim.url}/v1"  # the simulator itself as "another" endpoint
    with ApiServer(config) as server:
        s = spec(workload(tmp_path, n=6), targets=["moa-lite", endpoint], reference=TARGET)
        s = s.model_copy(update={"service_url": server.url})
        ev, report = await run(config, s, tmp_path / "run")
    # The service reports each request's cost through moa.detail; the bare endpoint cannot.
    assert report["targets"]["moa-lite"]["answers"]["cost_usd"] > 0
    assert report["targets"][endpoint]["answers"]["cost_usd"] is None
    # The endpoint and the service's direct call are the same simulated model: the same answers.
    for item in ev.items:
        a, b = ev.files.ok_answer(endpoint, item.id), ev.files.ok_answer(TARGET, item.id)
        assert a is not None and b is not None and a["answers"] == b["answers"]
    assert report["targets"]["moa-lite"]["pairwise"]["judgments"] == 12


async def test_a_preset_is_compared_with_itself_in_each_aggregation_mode(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path
) -> None:
    """``moa-lite:final`` and ``moa-lite:staircase`` answer the same questions, in-process and on a
    running service: the staircase target streams, so its aggregator (gpt-4.1) writes in steps
    while the proposers (120 tokens/s) still write; the final one calls it once per answer. The
    proposers write for a second or two: at a faster rate a busy machine's loop reached the first
    step only after they had finished, and a staircase of one step is the final mode's count."""
    slow = {"ttft_s": 0.05, "tokens_per_s": 120.0}
    set_profile(sim, {m: slow for m in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash")})
    modes = ["moa-lite:final", "moa-lite:staircase"]

    def aggregator_calls() -> int:
        stats = httpx.get(f"{sim.url}/admin/stats").json()
        return int(stats["models"].get("gpt-4.1", {}).get("requests", 0))

    s = spec(workload(tmp_path, n=3), targets=modes, reference=TARGET)
    before = aggregator_calls()
    ev, report = await run(config, s.model_copy(update={"targets": modes[:1]}), tmp_path / "final")
    assert aggregator_calls() - before == 3  # one synthesis per question
    before = aggregator_calls()
    ev, report = await run(config, s.model_copy(update={"targets": modes[1:]}), tmp_path / "stair")
    assert aggregator_calls() - before > 3  # steps, then the last one, per question
    stair = report["targets"]["moa-lite:staircase"]
    assert stair["pairwise"]["judgments"] == 6
    assert all(r["error"] is None and r["answers"][0] for r in ev.files.answers.values())
    # On a running service, the mode goes with each (streamed) request; the cost comes back.
    with ApiServer(config) as server:
        before = aggregator_calls()
        on_service = s.model_copy(update={"targets": modes[1:], "service_url": server.url})
        ev, report = await run(config, on_service, tmp_path / "service")
    assert aggregator_calls() - before > 3
    assert report["targets"]["moa-lite:staircase"]["answers"]["cost_usd"] > 0
    assert all(r["error"] is None and r["answers"][0] for r in ev.files.answers.values())


def test_only_a_preset_takes_an_aggregation_mode(config: MoAConfig) -> None:
    from moa.engine.engine import MoAEngine
    from moa.eval.targets import EngineTarget, TargetError, build_target

    engine = MoAEngine(config, caller=None)  # type: ignore[arg-type]  # never called here
    target = build_target("moa:early", config, engine)
    assert isinstance(target, EngineTarget) and (target.preset, target.aggregation) == ("moa", "early")
    assert isinstance(build_target("moa", config, engine), EngineTarget)
    with pytest.raises(TargetError, match="only a preset runs in an aggregation mode"):
        build_target("openai/gpt-4.1:staircase", config, engine)
    with pytest.raises(TargetError, match="unknown target"):
        build_target("moa:sideways", config, engine)


def test_cli_runs_writes_the_report_and_refuses_bad_input(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_profile(sim, {})
    cfg_file = tmp_path / "moa.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    path = workload(tmp_path, n=4)
    base = [
        "eval",
        "--config",
        str(cfg_file),
        "--workload",
        str(path),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    rc = main([*base, "--targets", "moa-lite", "--reference", TARGET, "--judges", JUDGE, "--run-id", "r1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "| `moa-lite` |" in out.out
    for name in ("report.json", "report.md", "report.png", "answers.jsonl", "judgments.jsonl", "run.json"):
        assert (tmp_path / "r1" / name).exists()
    assert main([*base, "--targets", "no-such-preset", "--reference", TARGET, "--run-id", "r2"]) == 2
    assert "unknown target 'no-such-preset'" in capsys.readouterr().err
    assert main([*base, "--targets", "moa-lite", "--run-id", "r3", "--mode", "pairwise"]) == 2
    assert "pairwise needs --reference" in capsys.readouterr().err


# -- shadow evaluation of live traffic -------------------------------------------------------------


def shadow_config(config: MoAConfig, **shadow: Any) -> MoAConfig:
    settings = {"enabled": True, "sample_rate": 1.0, "baseline": TARGET, "judge": JUDGE, **shadow}
    data = config.model_dump(mode="json")
    data["eval"] = {"shadow": settings}
    return MoAConfig.model_validate(data)


def test_shadow_judges_live_answers_in_the_background_and_keeps_a_win_rate(
    config: MoAConfig, sim: SimulatorServer
) -> None:
    # The judge always prefers gpt-4.1's answers: moa-lite's aggregator. The baseline is slow.
    set_profile(
        sim,
        {
            "gemini-2.5-pro": {"judge": JudgeProfile(favour="gpt-4.1", favour_p=1.0)},
            "claude-sonnet-4-6": {"faults": {"hang": {"hang_s": 1.5}}},
        },
    )
    cfg = shadow_config(config, presets=["moa-lite"], baseline="anthropic/claude-sonnet-4-6")
    with ApiServer(cfg) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        q = [{"role": "user", "content": "How do vaccines train the immune system?"}]
        client.chat.completions.create(model="moa-lite", messages=q)  # type: ignore[arg-type]
        api = server.server.api
        assert api is not None and api.shadow is not None
        # The answer is back while its shadow (a baseline that hangs 1.5 s) is still under way.
        assert api.shadow.snapshot()["in_flight"] == 1
        stream = client.chat.completions.create(model="moa-lite", messages=q, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.chat.completions.create(model="openai/gpt-4.1", messages=q)  # type: ignore[arg-type]
        wait_until_sync(
            lambda: api.shadow.snapshot()["presets"].get("moa-lite", {}).get("judged") == 2, what="shadows"
        )
        snap = api.shadow.snapshot()
    assert snap["sampled"] == 2  # the direct model call is not a preset: not shadowed
    tally = snap["presets"]["moa-lite"]
    assert tally["win_rate"] == 1.0 and tally["unparseable"] == 0 and tally["cost_usd"] > 0
    assert tally["interval"][1] == 1.0 and tally["interval"][0] < 0.5  # two wins: Wilson, still wide


# R's binom package, binom.confint(x, n, tol = 1e-8), method "wilson", as statsmodels records it in
# statsmodels/stats/tests/results/results_proportion.py (commit 1a63aa78b1c7bad09354b07b5bd4f700230a24a8):
# an implementation independent of ours. (30, 30) is where a Wald interval is [1, 1].
R_BINOM_WILSON = {
    (18, 20): (0.6989663547715128, 0.972133518786232),
    (4, 20): (0.0806576625797981, 0.4160174322518935),
    (4, 200): (0.00780442641634947, 0.05028708690582643),
    (190, 200): (0.910421851861224, 0.972617354399236),
    (1, 30): (5.908590e-03, 0.16670391),
    (29, 30): (0.8332961, 0.9940914),
    (0, 30): (0.0, 0.11351339),
    (30, 30): (0.8864866, 1.0),
}


@pytest.mark.parametrize(("case", "expected"), list(R_BINOM_WILSON.items()))
def test_the_running_win_rate_interval_is_wilsons_as_r_computes_it(
    case: tuple[int, int], expected: tuple[float, float]
) -> None:
    wins, n = case
    tally = PresetTally()
    for i in range(n):
        tally.add(1.0 if i < wins else 0.0)
    assert tally.interval() == pytest.approx(expected, abs=1e-6)
    assert wilson_interval(wins, n) == pytest.approx(expected, abs=1e-6)


def test_two_wins_leave_the_running_interval_wide() -> None:
    tally = PresetTally()
    assert tally.interval() == (0.0, 1.0)  # nothing judged yet: nothing known
    tally.add(1.0)
    tally.add(1.0)
    low, high = tally.interval()
    assert high == 1.0 and 0.3 < low < 0.4  # two wins say little; a Wald interval said [1, 1]
    tally.add(0.5)  # a tie counts a half success
    assert tally.win_rate == pytest.approx(2.5 / 3)
    assert tally.interval() == pytest.approx(wilson_interval(2.5, 3))


def test_shadow_respects_its_spend_limit(config: MoAConfig, sim: SimulatorServer) -> None:
    set_profile(sim, {})
    cfg = shadow_config(config, max_cost_usd_per_hour=0.0001)
    with ApiServer(cfg) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "Hi there"}])  # type: ignore[list-item]
        api = server.server.api
        assert api is not None and api.shadow is not None
        snap = api.shadow.snapshot()
    assert snap["sampled"] == 1 and snap["skipped_budget"] == 1 and snap["presets"] == {}


def test_shadow_config_names_configured_models(config: MoAConfig) -> None:
    with pytest.raises(ValueError, match=r"eval\.shadow\.judge: unknown model"):
        shadow_config(config, judge="openai/no-such-model")
    with pytest.raises(ValueError, match="needs baseline and judge"):
        shadow_config(config, judge=None)
    with pytest.raises(ValueError, match=r"eval\.shadow\.presets: unknown preset\(s\) nope"):
        shadow_config(config, presets=["moa", "nope"])


def test_a_line_cut_by_an_interruption_is_asked_again(tmp_path: Path) -> None:
    from moa.eval.runner import RunFiles

    done = {"target": "moa", "item": "1", "answers": ["a"], "cost_usd": 0.1, "error": None}
    (tmp_path / "answers.jsonl").write_text(json.dumps(done) + '\n{"target": "moa", "item": "2", "ans')
    files = RunFiles(tmp_path)
    assert files.ok_answer("moa", "1") == done
    assert files.ok_answer("moa", "2") is None
    assert files.spent() == pytest.approx(0.1)
    again = {**done, "item": "2"}
    files.add_answer(again)
    assert RunFiles(tmp_path).ok_answer("moa", "2") == again  # appended on a line of its own


def test_shadow_is_recorded_on_the_requests_trace(
    config: MoAConfig, sim: SimulatorServer, otlp: OTLPReceiver
) -> None:

    set_profile(sim, {"gemini-2.5-pro": {"judge": JudgeProfile(favour="gpt-4.1", favour_p=1.0)}})
    body = {"model": "moa-lite", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    with ApiServer(shadow_config(config)) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        spans = wait_for_spans(otlp, r.headers["x-moa-trace-id"], {"moa.shadow", "chat gemini-2.5-pro"})
    (server_span,) = by_name(spans, "POST /v1/chat/completions")
    (shadow,) = by_name(spans, "moa.shadow")
    assert shadow["parent_id"] == server_span["span_id"]
    assert shadow["attributes"]["moa.shadow.outcome"] == "win"
    assert shadow["attributes"]["moa.shadow.cost_usd"] > 0
    judge_calls = [s for s in by_name(spans, "chat gemini-2.5-pro") if s["parent_id"] == shadow["span_id"]]
    assert len(judge_calls) == 2  # both orders


# -- a pair with one order unread ------------------------------------------------------------------


def test_the_report_drops_a_pair_with_an_order_it_could_not_read(tmp_path: Path) -> None:
    """A judge that always picks the answer shown first: each pair read both ways is even (0.5).
    Two pairs lost an order (one unparseable, one whose judge call failed) and, counted on the
    order left, would each be a win for the target: the rule drops them (``pair_preference``)."""
    from moa.eval.runner import RunFiles

    files = RunFiles(tmp_path)
    items = [Item(id=str(i), category="all", turns=("q",)) for i in range(5)]
    for item in items:
        for target, text in (("T", "a long answer " * 20), ("R", "short")):
            files.add_answer(
                {"target": target, "item": item.id, "answers": [text], "cost_usd": 0.0, "error": None}
            )

    def judged(item: str, order: str, verdict: str | None, error: str | None = None) -> None:
        unread = verdict is None and error is None
        rec = {"kind": "pairwise", "judge": "J", "target": "T", "item": item, "order": order}
        files.add_judgment({**rec, "verdict": verdict, "error": error, "retried": unread, "cost_usd": 0.0})

    for item in ("0", "1", "2"):
        judged(item, "target_first", "A")
        judged(item, "reference_first", "A")
    judged("3", "target_first", "A")
    judged("3", "reference_first", None)  # unparseable, even after the retry
    judged("4", "target_first", "A")
    judged("4", "reference_first", None, error="server_error: scripted")
    spec = EvalSpec(workload="w.jsonl", targets=["T"], reference="R", judges=["J"])
    pw = build_report(spec, files, items, None)["targets"]["T"]["pairwise"]
    assert pw["win_rate"]["value"] == 0.5  # 0.7 with the lone orders counted
    assert pw["win_rate_by_judge"]["J"]["value"] == 0.5
    assert pw["items_judged"] == 3 and pw["pairs_dropped"] == 2
    assert pw["unparseable"] == 1 and pw["judge_errors"] == 1
    assert "Pairs left out of the win rates" in markdown(build_report(spec, files, items, None))


def test_judge_errors_are_in_the_printed_table_and_report_md(tmp_path: Path) -> None:
    """A judge call that failed is neither a verdict nor an unparseable reply: its count is a
    column of the table ``moa eval`` prints and writes to report.md (pairwise and graded), not
    only a field of report.json."""
    from moa.eval.runner import RunFiles

    files = RunFiles(tmp_path)
    items = [Item(id=str(i), category="all", turns=("q",)) for i in range(3)]
    for item in items:
        for target in ("T", "R"):
            files.add_answer(
                {"target": target, "item": item.id, "answers": ["x"], "cost_usd": 0.0, "error": None}
            )
    errors = {
        "0": "server_error: the judge's server fell over",
        "1": None,
        "2": "timeout: the call timed out",
    }
    for item, error in errors.items():
        for order in ("target_first", "reference_first"):
            rec = {"kind": "pairwise", "judge": "J", "target": "T", "item": item, "order": order}
            verdict = None if error else "A"
            files.add_judgment({**rec, "verdict": verdict, "error": error, "retried": False, "cost_usd": 0.0})
    spec = EvalSpec(workload="w.jsonl", targets=["T"], reference="R", judges=["J"])
    report = build_report(spec, files, items, None)
    assert report["targets"]["T"]["pairwise"]["judge_errors"] == 4
    table = markdown(report).splitlines()
    header = next(line for line in table if line.startswith("| target |"))
    row = next(line for line in table if line.startswith("| `T` |"))
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" judge errors "].strip() == "4" and cells[" unparseable (retried) "].strip() == "0 (0)"

    (tmp_path / "graded").mkdir()
    graded = RunFiles(tmp_path / "graded")
    for item in items:
        graded.add_answer({"target": "T", "item": item.id, "answers": ["x"], "cost_usd": 0.0, "error": None})
        rec = {"kind": "graded", "judge": "J", "target": "T", "item": item.id, "order": None, "cost_usd": 0.0}
        error = errors[item.id]
        graded.add_judgment({**rec, "score": None if error else 7.0, "error": error, "retried": False})
    gspec = EvalSpec(workload="w.jsonl", targets=["T"], mode="graded", judges=["J"])
    table = markdown(build_report(gspec, graded, items, None)).splitlines()
    header = next(line for line in table if line.startswith("| target |"))
    row = next(line for line in table if line.startswith("| `T` |"))
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" judge errors "].strip() == "2"


async def test_a_retried_judge_keeps_every_reply_and_raw_is_always_the_last() -> None:
    """A judge whose first reply carries no verdict is asked once more: both replies are kept
    (``replies``), and ``raw`` is the reply the verdict was read from, as in a judgment that was
    not retried."""
    from moa import load_config
    from moa.eval.budget import Budget
    from moa.eval.judging import Judge
    from moa.testing import Reply

    caller = ScriptedCaller()
    caller.script("openai/gpt-4.1", Reply(text="Both are fine; I cannot say."), Reply(text="[[B]]"))
    judge = Judge("openai/gpt-4.1", load_config(None), caller, max_tokens=64)
    out = await judge.pairwise("q?", "first", "second", Budget())
    assert out.retried and out.verdict is Verdict.B
    assert out.replies == ["Both are fine; I cannot say.", "[[B]]"] and out.raw == "[[B]]"
    caller.script("openai/gpt-4.1", Reply(text="[[A]]"))
    once = await judge.pairwise("q?", "first", "second", Budget())
    assert not once.retried and once.replies == ["[[A]]"] and once.raw == "[[A]]"


async def test_the_judges_prompts_are_eval_templates_and_still_read_under_templates() -> None:
    """The judges' prompts are ``eval.templates`` (``templates`` holds the prompts the engine
    writes); given where they were before, under ``templates``, they still reach the judge; given
    in both places, the config is refused."""
    from moa import load_config, parse_config
    from moa.config import ConfigError
    from moa.eval.budget import Budget
    from moa.eval.judging import Judge

    raw = load_config(None).model_dump(mode="json")
    del raw["eval"]["templates"]
    raw["templates"]["judge_pairwise_system"] = "Judge strictly. End with [[A]], [[B]] or [[C]]."
    cfg = parse_config(raw)
    assert cfg.eval.templates.judge_pairwise_system.startswith("Judge strictly")
    assert "judge_pairwise_system" not in cfg.templates.model_dump()
    caller = ScriptedCaller()
    caller.script("openai/gpt-4.1", "[[A]]")
    await Judge("openai/gpt-4.1", cfg, caller, max_tokens=64).pairwise("q?", "a", "b", Budget())
    assert caller.calls[0].request.messages[0].content.startswith("Judge strictly")
    raw["eval"]["templates"] = {"judge_pairwise_system": "Another judge. [[A]], [[B]] or [[C]]."}
    with pytest.raises(ConfigError, match=r"give eval\.templates only \(judge_pairwise_system"):
        parse_config(raw)
    raw["templates"].pop("judge_pairwise_system")
    raw["eval"]["templates"]["judge_pairwise"] = "no placeholders"
    with pytest.raises(ConfigError, match=r"eval\.templates\.judge_pairwise must contain"):
        parse_config(raw)


async def test_the_shadow_counts_a_pair_with_an_order_it_could_not_read_as_unparseable() -> None:
    """The same rule on live traffic: the judge picks the served answer shown first, then cannot
    be read (twice: the retry too) with the answers swapped. One order alone is no win."""
    from moa import MoAEngine, load_config

    cfg = shadow_config(load_config(None), presets=["moa-lite"])
    caller = ScriptedCaller(default="an answer")
    caller.script(JUDGE, "Assistant A is better.\n\n[[A]]", "Both have merit.")
    messages = [ChatMessage(role="user", content="Why is the sky blue?")]
    result = await MoAEngine(cfg, caller).run(messages, preset="moa-lite")
    shadow = ShadowEvaluator(cfg, caller, seed=0)
    assert shadow.offer(messages, result, "moa-lite")
    await shadow.wait_idle()
    judge_calls = [c for c in caller.calls if f"{c.request.provider}/{c.request.model}" == JUDGE]
    assert len(judge_calls) == 3  # the served-first order, the swapped one and its retry
    tally = shadow.snapshot()["presets"]["moa-lite"]
    assert tally["unparseable"] == 1 and tally["judged"] == 0 and tally["win_rate"] is None
