"""A small smoke run of the benchmark harness, to keep it working (no performance assertion)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress

import moa.engine.fusion
from moa.benchmark.baseline import RETRY, Baseline, Said, aggregator_messages
from moa.benchmark.runner import HttpTarget, ProcessTree, load_prompts, markdown, run_level, write_report
from moa.benchmark.stats import OLD_NAMES, Sample, breakdown, decompose, percentile, summarize
from moa.config import MoAConfig, RetryConfig
from moa.engine.prompts import with_references
from moa.plan import TemplatesConfig
from moa.simulator.server import SimulatorServer
from moa.simulator.text import compose
from moa.tokens import approx_message_tokens
from moa.types import ChatMessage
from tests.helpers import ApiServer, set_fault

QUESTION = "How does a compiler work?"


def test_prompt_files_in_both_formats(tmp_path: Path) -> None:
    assert len(load_prompts(None)) >= 10
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"id": 1, "prompt": "A?"}\n\n{"question_id": 2, "category": "x", "turns": ["B?", "C?"]}\n'
    )
    assert load_prompts(path) == ["A?", "B?"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(path)


def test_statistics() -> None:
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([3, 1, 2, 4], 99) == 4
    assert math.isnan(percentile([], 50))
    samples = [
        Sample(e2e_s=1.0, ok=True, simulated_s=0.9, met_quorum=True),
        Sample(e2e_s=2.0, ok=True, simulated_s=1.95, met_quorum=False),
        Sample(e2e_s=3.0, ok=False, error="504"),
        # Waited 2 s of grace on a straggler: policy, not overhead.
        Sample(e2e_s=2.5, ok=True, simulated_s=0.5, met_quorum=True, cut_straggler=True),
    ]
    s = summarize(samples, wall_s=2.0, cpu_s=0.4, peak_rss_mb=100)
    assert (s["requests"], s["ok"], s["errors"], s["cut_stragglers"]) == (4, 3, 1, 1)
    assert s["rps"] == 1.5 and s["p99_ms"] == 3000  # failures count with the time they took
    assert s["overhead_p50_ms"] == pytest.approx(50) and s["overhead_p99_ms"] == pytest.approx(100)
    assert s["cpu_ms_per_request"] == pytest.approx(100) and s["quorum_met_share"] == pytest.approx(2 / 4)
    # The work done, and end-to-end time per unit of it (cut stragglers left out, as for overhead).
    assert s["simulated_p50_ms"] == pytest.approx(900)
    assert s["e2e_per_simulated_p50"] == pytest.approx(2 / 1.95)  # of 1/0.9 and 2/1.95


def _dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def test_baseline_aggregator_prompt_is_the_services() -> None:
    """Written separately, rendered the same: the service's system prompt, reference blocks and all."""
    answers = ["First {answer} with braces.", "Second,\nover two lines.", "Third."]
    ours = aggregator_messages(QUESTION, answers)
    service = with_references([ChatMessage(role="user", content=QUESTION)], answers, TemplatesConfig())
    assert ours == _dicts(service)
    assert '<reference id="3">\nThird.\n</reference>' in ours[0]["content"]
    # ... which the simulator answers as an aggregation of all three.
    answer = compose("gpt-4.1", "structured", tuple((m["role"], m["content"]) for m in ours), None, None)
    assert answer.startswith("Synthesis of 3 references (merged: 1, 2, 3).")


async def test_baseline_and_report(sim: SimulatorServer, tmp_path: Path) -> None:
    base = Baseline(sim.url)
    tree = ProcessTree(exclude=set())
    # Not a terminal (a CI log, nohup): the bar does not show, each finished level's line does.
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with Progress(console=console) as progress:
        task = progress.add_task("smoke", total=3)
        prompts = ["What is DNS?", "Why is the sky blue?"]
        row = await run_level(base.ask, prompts, 2, 3, tree, progress, task, "baseline c=2")
    await base.aclose()
    assert row["ok"] == 3 and row["overhead_p50_ms"] > 0 and row["cpu_ms_per_request"] > 0
    out = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    (line,) = [x for x in out if x.startswith("baseline c=2")]
    assert (
        line.startswith("baseline c=2: 3/3 ok, ") and "req/s, p50 " in line and line.endswith("errors: none")
    )
    report = {"options": {}, "levels": [{"target": "baseline", "concurrency": 2, **row}], "scenarios": []}
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["levels"][0]["ok"] == 3
    assert "| baseline | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_http_target_reads_the_detail_extension(config: MoAConfig, sim: SimulatorServer) -> None:
    with ApiServer(config) as server:
        target = HttpTarget(server.url, "moa-lite")
        sample = asyncio.run(target.send("How does a compiler work?"))
        assert sample.ok and sample.met_quorum and sample.simulated_s and sample.overhead_s is not None
        assert 0 < sample.overhead_s < sample.e2e_s and not sample.cut_straggler
        # A hanging proposer is cut after quorum + grace: that wait is not counted as overhead.
        # (A new target: the first one's connection pool belongs to the closed event loop.)
        set_fault(sim, "gemini-2.5-flash", hang={"rate": 1.0})
        cut = asyncio.run(HttpTarget(server.url, "moa-lite").send("How does a compiler work?"))
    assert cut.ok and cut.met_quorum and cut.cut_straggler and cut.overhead_s is None


def test_auth_overhead_bench_runs_open_key_and_budget_side_by_side(tmp_path: Path) -> None:
    """`moa bench --auth-overhead` in miniature: every variant answers (so the keyed ones passed
    their checks) and the report says what each added over the open API."""
    from moa.benchmark.auth_cost import run_auth_overhead, write_auth_report

    report = asyncio.run(run_auth_overhead([1], 2, ttft_s=0.02, tokens_per_s=2000, jitter=0))
    write_auth_report(report, tmp_path)
    rows = {r["variant"]: r for r in report["levels"]}
    assert set(rows) == {"open", "key", "key+budget"}
    assert all(r["errors"] == 0 and r["requests"] == 2 for r in rows.values())
    assert rows["open"]["added_p50_ms"] == 0 and not math.isnan(rows["key+budget"]["added_p99_ms"])
    assert json.loads((tmp_path / "auth-overhead.json").read_text())["store"] == "sqlite"
    assert "| key+budget | 1 |" in (tmp_path / "auth-overhead.md").read_text()
    alone = {r["variant"]: r for r in report["checks_alone"]}
    assert set(alone) == set(rows) and all(r["p50_ms"] > 0 for r in alone.values())


def _simulated(config: MoAConfig, question: str) -> float:
    with ApiServer(config) as server:
        body = {
            "model": "moa-lite",
            "messages": [{"role": "user", "content": question}],
            "moa": {"detail": True},
        }
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    r.raise_for_status()
    return float(r.json()["moa"]["totals"]["provider_critical_path_s"])


async def _ask(sim: SimulatorServer, question: str, timeout_s: float = 60.0) -> Sample:
    base = Baseline(sim.url, timeout_s=timeout_s)
    try:
        return await base.ask(question)
    finally:
        await base.aclose()


def test_baseline_and_service_send_the_aggregator_the_same_request(
    config: MoAConfig, sim: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For the same proposals both aggregators get the same messages, so they do the same work."""
    seen: list[list[dict[str, str]]] = []

    def recording(messages: Sequence[ChatMessage], answers: Sequence[str], *a: Any, **k: Any) -> Any:
        out = with_references(messages, answers, *a, **k)
        seen.append(_dicts(out))
        return out

    monkeypatch.setattr(moa.engine.fusion, "with_references", recording)
    service_simulated = _simulated(config, QUESTION)
    base = Baseline(sim.url)
    sent: list[tuple[str, list[dict[str, str]]]] = []
    original = base._openai

    async def openai_call(model: str, messages: list[dict[str, str]]) -> Said:
        sent.append((model, messages))
        return await original(model, messages)

    base._openai = openai_call  # type: ignore[method-assign]

    async def ask() -> Sample:
        try:
            return await base.ask(QUESTION)
        finally:
            await base.aclose()

    sample = asyncio.run(ask())
    assert sample.ok
    [service_messages] = seen
    [baseline_messages] = [msgs for m, msgs in sent if m == "gpt-4.1"]
    assert baseline_messages == service_messages
    assert baseline_messages[0]["content"].count("<reference id=") == 3
    # Same proposals, same aggregator request: the same simulated model time (no jitter here).
    assert sample.simulated_s == pytest.approx(service_simulated)


def test_baseline_retry_policy_is_the_services_default() -> None:
    assert vars(RETRY) == RetryConfig().model_dump()
    base = Baseline("http://127.0.0.1:9")
    try:
        assert base.openai.max_retries == 0 and base.anthropic.max_retries == 0
    finally:
        asyncio.run(base.aclose())


def _requests(sim: SimulatorServer, model: str) -> int:
    stats = httpx.get(sim.url + "/admin/stats").json()["models"]
    return int(stats.get(model, {}).get("requests", 0))


def _reset(sim: SimulatorServer) -> None:
    httpx.delete(sim.url + "/admin/faults").raise_for_status()
    httpx.post(sim.url + "/admin/reset", json={}).raise_for_status()


PROPOSERS = ["gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash"]


@pytest.mark.parametrize("model", PROPOSERS)
def test_a_failed_first_attempt_is_retried_alike_by_both(
    config: MoAConfig, sim: SimulatorServer, model: str
) -> None:
    """One 500 on a proposer: each SDK's call is retried once by the baseline, as by the service."""
    set_fault(sim, model, error_500={"first_n": 1})
    sample = asyncio.run(_ask(sim, QUESTION))
    assert sample.ok and _requests(sim, model) == 2
    _reset(sim)
    set_fault(sim, model, error_500={"first_n": 1})
    _simulated(config, QUESTION)
    assert _requests(sim, model) == 2


@pytest.mark.parametrize("model", PROPOSERS)
def test_the_baseline_gives_up_after_the_policys_attempts(sim: SimulatorServer, model: str) -> None:
    set_fault(sim, model, error_500={"first_n": RETRY.max_attempts})
    sample = asyncio.run(_ask(sim, QUESTION))
    assert not sample.ok and _requests(sim, model) == RETRY.max_attempts


def test_the_baseline_waits_as_retry_after_says(sim: SimulatorServer) -> None:
    set_fault(sim, "gemini-2.5-flash", error_429={"first_n": 1, "retry_after_s": 0.6})
    t0 = time.perf_counter()
    sample = asyncio.run(_ask(sim, QUESTION))
    assert sample.ok and time.perf_counter() - t0 >= 0.6 and _requests(sim, "gemini-2.5-flash") == 2
    # A Retry-After past the policy's limit is not waited for.
    _reset(sim)
    set_fault(sim, "gemini-2.5-flash", error_429={"first_n": 1, "retry_after_s": RETRY.max_retry_after_s + 1})
    failed = asyncio.run(_ask(sim, QUESTION))
    # Not waited for: it gave up sooner than the hint said, with no second attempt.
    assert not failed.ok and failed.e2e_s < RETRY.max_retry_after_s + 1
    assert _requests(sim, "gemini-2.5-flash") == 1


def test_the_baseline_deadline_spans_its_attempts(sim: SimulatorServer) -> None:
    """A hang uses the whole call deadline: there is no time left for another attempt."""
    set_fault(sim, "gemini-2.5-flash", hang={"rate": 1.0})
    sample = asyncio.run(_ask(sim, QUESTION, timeout_s=1.0))
    # It waited out the whole deadline (a lower bound the hang guarantees), and the simulator saw
    # one attempt only: none was left time for.
    assert not sample.ok and sample.e2e_s >= 0.95 and _requests(sim, "gemini-2.5-flash") == 1


def test_reports_without_the_newer_columns_still_render() -> None:
    """The committed older reports predate some columns: they render with "-" there."""
    old = json.loads((Path(__file__).parents[1] / "docs/bench-results-pass1.json").read_text())
    assert "| baseline | 1 | 0.1 | 7714 |" in markdown(old)


def test_overhead_breakdown_adds_up() -> None:
    def call(stage: str, started: float, latency: float, sim: float, layer: int | None = 1) -> dict[str, Any]:
        return {
            "stage": stage,
            "layer": layer,
            "model": "m",
            "ok": True,
            "cancelled_straggler": False,
            "started_s": started,
            "latency_s": latency,
            "provider_service_s": sim,
        }

    request = {
        "e2e_s": 2.110,
        "wall_time_s": 2.100,
        "provider_critical_path_s": 1.5 + 0.5,
        "calls": [
            call("proposer", 0.002, 1.0, 0.99),
            call("proposer", 0.002, 1.504, 1.5),  # the slowest: ends at 1.506
            call("aggregator", 1.512, 0.505, 0.5, layer=None),  # ends at 2.017
        ],
    }
    parts = decompose(request)
    assert parts is not None
    assert parts == pytest.approx(
        {
            "http_api_ms": 10,
            "before_first_call_ms": 2,
            "layer_crossings_ms": 6,
            "final_call_ms": 83,
            "exchange_ms": 4 + 5,
        }
    )
    assert sum(parts.values()) == pytest.approx(1000 * (2.110 - 2.0))
    cut = {**request, "calls": [*request["calls"][:2], {**request["calls"][2], "cancelled_straggler": True}]}
    assert decompose(cut) is None
    assert breakdown([request, cut])["split"] == 1
    # A raw file kept before the rename names the reported times the old way: read the same.
    old = {OLD_NAMES.get(k, k): v for k, v in request.items()}
    old["calls"] = [{OLD_NAMES.get(k, k): v for k, v in c.items()} for c in request["calls"]]
    assert "provider_critical_path_s" not in old and decompose(old) == parts
    assert breakdown([old]) == breakdown([request])


def test_http_target_keeps_the_timings_it_is_asked_to(config: MoAConfig, sim: SimulatorServer) -> None:
    kept: list[dict[str, Any]] = []
    with ApiServer(config) as server:
        sample = asyncio.run(HttpTarget(server.url, "moa-lite", keep=kept).send(QUESTION))
    [request] = kept
    parts = decompose(request)
    assert sample.ok and sample.overhead_s is not None and parts is not None
    assert sum(parts.values()) == pytest.approx(1000 * sample.overhead_s, abs=0.01)
    report = {
        "options": {},
        "levels": [],
        "scenarios": [],
        "details": [{"target": "serve moa-lite", "concurrency": 1, "requests": kept}],
    }
    assert "(p50 over 1 of 1 requests)" in markdown(report)


def test_profile_buckets_raw_stacks() -> None:
    from moa.benchmark.profile import summarize_raw

    py = "/usr/lib/python3.11"
    site = "/venv/lib/python3.11/site-packages"
    raw = "\n".join(
        [
            f"main (/app/serve_app.py:1);Worker.main_loop ({site}/ray/_private/worker.py:9) 6",
            f"run ({py}/asyncio/base_events.py:1);call (/app/moa/engine/engine.py:3);"
            f"create ({site}/openai/resources/chat.py:5) 3",
            f"run ({py}/asyncio/base_events.py:1);_record ({site}/ray/serve/_private/metrics.py:2) 1",
            "not a stack line",
        ]
    )
    s = summarize_raw(raw, rate=100)
    assert s["samples"] == 10 and s["python_s"] == pytest.approx(0.1)
    assert s["self_share"]["Ray core"] == pytest.approx(0.6)
    assert s["self_share"]["LLM SDKs + HTTP clients"] == pytest.approx(0.3)
    assert s["self_share"]["Ray Serve"] == pytest.approx(0.1)
    # Inclusive: the SDK call under the engine counts, and so does the main script.
    assert s["project_inclusive_share"] == pytest.approx(0.9)


def test_profile_counts_an_installed_wheels_frames_as_the_project() -> None:
    """An installed wheel runs the folders under their import names (moa_actors/, ...), not the
    folder names: its frames are the project's all the same, and a package merely named like
    one (a site-packages ``actorsx``) is not."""
    from moa.benchmark.profile import summarize_raw

    site = "/venv/lib/python3.11/site-packages"
    raw = "\n".join(
        [
            f"main ({site}/moa_serve_app.py:1);call ({site}/ray/_private/worker.py:9) 2",
            f"handle ({site}/moa_actors/provider.py:1);emit ({site}/moa_observability/tracing.py:2) 3",
            f"other ({site}/actorsx/core.py:1) 5",
        ]
    )
    s = summarize_raw(raw, rate=100)
    assert s["project_inclusive_share"] == pytest.approx(0.5)
    assert s["self_share"]["project"] == pytest.approx(0.3)


def test_a_streaming_target_times_first_byte_and_first_token(config: MoAConfig, sim: SimulatorServer) -> None:
    # Proposers slow enough that the first byte (at admission) and the first token (after the
    # proposers) are far apart.
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    slow = {"ttft_s": 0.8, "tokens_per_s": 2000.0, "jitter": 0.0}
    profile["models"] = {m: slow for m in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash")}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()
    with ApiServer(config) as server:
        target = HttpTarget(server.url, "moa-lite", stream=True, aggregation="early")
        sample = asyncio.run(target.send(QUESTION))
    assert sample.ok and sample.first_byte_s is not None and sample.ttft_s is not None
    # The first byte went out at admission, before the proposers' 0.8 s had passed: the first
    # token came at least that much later (lower bounds the simulator's sleeps guarantee, with no
    # upper bound on how busy the machine is). A service that sent its headers with the first
    # token would have them within a few milliseconds of each other.
    assert sample.first_byte_s + 0.8 <= sample.ttft_s <= sample.e2e_s
    assert sample.tokens and sample.tokens > 0 and sample.cost_usd and sample.cost_usd > 0
    row = summarize([sample], 1.0, 0.0, 0.0)
    assert row["ttft_p50_ms"] == pytest.approx(1000 * sample.ttft_s)
    report = {"levels": [{"target": "serve moa-lite (early)", "concurrency": 1, **row}], "scenarios": []}
    assert "| serve moa-lite (early) | 1 | " in markdown(report).split("streaming target")[1]


def test_a_target_reports_what_prompt_caching_read_and_saved(config: MoAConfig, sim: SimulatorServer) -> None:
    # A question over the 1024-token minimum, asked twice: the second time the OpenAI and Gemini
    # proposers read their prompt (the question alone) from their providers' caches (Anthropic
    # caches only when asked), and the aggregator's prompt may be read too (the same answers).
    question = "Summarise the following notes on how vaccines train the immune system. " * 70
    with ApiServer(config) as server:
        first, again = (asyncio.run(HttpTarget(server.url, "moa-lite").send(question)) for _ in range(2))
    assert first.ok and again.ok and first.cached_tokens == 0 and first.cache_saved_usd == 0
    assert again.cached_tokens and again.input_tokens and 0 < again.cached_tokens < again.input_tokens
    # gpt-4.1-mini and gemini-2.5-flash read at least the question's whole blocks.
    block = approx_message_tokens([question]) // 128 * 128
    assert again.cached_tokens >= 2 * block
    saved = block * ((0.4 - 0.1) + (0.3 - 0.075)) / 1_000_000  # their input minus cached prices
    assert again.cache_saved_usd is not None and again.cache_saved_usd >= saved
    row = summarize([again], 1.0, 0.0, 0.0)
    report = {"levels": [{"target": "serve moa-lite", "concurrency": 1, **row}], "scenarios": []}
    (table,) = [t for t in markdown(report).split("\n\n") if t.startswith("| prompt caching")]
    assert f"| serve moa-lite | 1 | {again.input_tokens} | {again.cached_tokens} |" in table


def test_the_bench_can_set_every_presets_staircase_chunk_size() -> None:
    from moa.benchmark.runner import bench_config

    layered = [p for p in bench_config("http://127.0.0.1:9", 30.0, 120).presets.values() if p.layers]
    assert layered and {p.staircase_chunk_chars for p in layered} == {120}
    own = {p.staircase_chunk_chars for p in bench_config("http://127.0.0.1:9", 30.0).presets.values()}
    assert own == {200}  # the bundled presets' own


DOCS = Path(__file__).parents[1] / "docs"
# Raw files whose every table docs/BENCHMARKS.md shows exactly as `moa bench` renders it; for the
# streaming runs, the page shows the streaming table (their request table is in the file only).
RENDERED_TABLES = {
    "bench-results.json": None,
    "bench-results-fair.json": None,
    "bench-fast.json": None,
    "bench-fast-haproxy.json": None,
    "bench-ttft-aggregation.json": "| streaming target",
    "bench-ttft-staircase.json": "| streaming target",
    "bench-ttft-staircase-layers.json": "| streaming target",
    "bench-ttft-modes.json": ("| streaming target", "| prompt caching"),
    "bench-ttft-staircase-chunk200.json": "| streaming target",
    "bench-ttft-staircase-chunk100.json": "| streaming target",
    "bench-ttft-staircase-default.json": "| streaming target",
    "bench-ttft-staircase-lite-chunk20.json": "| streaming target",
    "bench-local-after.json": None,
    "bench-local-gc.json": None,
    "bench-local-before.json": None,
    "bench-local-details-before.json": None,
    "bench-local-details-after.json": None,
    "bench-local-ab/before-1.json": "| target",
    "bench-local-ab/after-1.json": "| target",
    "bench-local-ab/before-2.json": "| target",
    "bench-local-ab/after-2.json": "| target",
    "bench-compare.json": ("| target", "| like for like"),
    "bench-compare-moa.json": "| like for like: local moa against",
    "bench-local-c64-1.json": "| target",
    "bench-local-c64-2.json": "| target",
    # Ray's Python proxy against HAProxy (splicing off), alternating (issue 31)
    "bench-ingress/without-1.json": "| target",
    "bench-ingress/with-1.json": "| target",
    "bench-ingress/without-2.json": "| target",
    "bench-ingress/with-2.json": "| target",
    "bench-local-streams/after-1.json": "| target",
    "bench-local-streams/before-1.json": "| target",
    "bench-local-streams/after-2.json": "| target",
    "bench-local-streams/before-2.json": "| target",
    "bench-local-streams/before-3.json": "| target",
    "bench-local-streams/after-3.json": "| target",
    # the OpenAI and Anthropic clients on aiohttp, before and after, alternating (issue 31)
    "bench-local-aiohttp/before-1.json": "| target",
    "bench-local-aiohttp/after-1.json": "| target",
    "bench-local-aiohttp/before-2.json": "| target",
    "bench-local-aiohttp/after-2.json": "| target",
    # issue 31's goals side by side on a quiet machine
    "bench-goals.json": None,
    "bench-goals-haproxy.json": "| target",
    "bench-compare-c16.json": ("| target", "| like for like"),
}


@pytest.mark.parametrize("name", sorted(RENDERED_TABLES))
def test_benchmarks_md_shows_the_raw_files_rendered(name: str) -> None:
    """A figure in a table of BENCHMARKS.md is the figure in its raw file: regenerate a table
    with ``runner.markdown`` from the JSON, never edit it by hand."""
    doc = (DOCS / "BENCHMARKS.md").read_text()
    assert f"]({name})" in doc or f"`{name}`" in doc, f"BENCHMARKS.md never names its raw file {name}"
    tables = markdown(json.loads((DOCS / name).read_text())).strip().split("\n\n")
    only = RENDERED_TABLES[name]
    shown = [t for t in tables if only is None or t.startswith(only)]
    assert shown, f"{name} renders no table starting with {only!r}"
    for table in shown:
        assert table in doc, f"BENCHMARKS.md does not show this table of {name} as rendered:\n{table}"


@pytest.mark.parametrize("folder", ["bench-profile", "bench-profile-local", "bench-profile-serve"])
def test_benchmarks_md_profile_table_is_its_raw_stacks_summarised(folder: str) -> None:
    """The profile tables on the page are ``moa.benchmark.profile --summarize`` of the committed
    raw stacks (``docs/<folder>/*.txt.gz``), so a share on the page can be traced to samples."""
    from moa.benchmark import profile

    raw = DOCS / folder
    assert sorted(p.name for p in raw.glob("*.txt.gz")), "no raw stacks committed"
    table = profile.markdown(profile.summarize_dir(raw)).strip()
    assert table in (DOCS / "BENCHMARKS.md").read_text()


@pytest.mark.parametrize("name", ["spend-audit-local.json", "spend-audit-ray.json"])
def test_reliability_md_shows_the_spend_audits_rendered(name: str) -> None:
    """The spend audit's tables in RELIABILITY.md are its raw files rendered, and every check in
    them met its goal when it was run (the audit exits 1 otherwise)."""
    from moa.benchmark.spend_audit import audit_markdown

    doc = (DOCS / "RELIABILITY.md").read_text()
    raw = json.loads((DOCS / name).read_text())
    assert f"]({name})" in doc and audit_markdown(raw) in doc
    assert raw["met"] and all(raw[k]["met"] for k in ("ledger", "budget", "tpm", "hog"))


# -- moa bench --batch ---------------------------------------------------------------------------------


def test_the_batch_benchs_synthetic_set_and_mt_bench_items(tmp_path: Path) -> None:
    from moa.benchmark.batch_bench import main, mt_bench_items, synthetic_items

    items = synthetic_items(2000)
    assert len({i["custom_id"] for i in items}) == len({i["prompt"] for i in items}) == 2000
    assert synthetic_items(50) == items[:50] and synthetic_items(50, seed=1) != items[:50]
    out = tmp_path / "syn.jsonl"
    assert main(["--synthetic", "30", str(out)]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == items[:30]
    mt = tmp_path / "mt.jsonl"
    mt.write_text('{"question_id": 81, "category": "writing", "turns": ["First?", "Second?"]}\n')
    assert mt_bench_items(mt) == [{"custom_id": "mt-81", "prompt": "First?"}]


def test_what_the_limits_allow_and_the_memory_slope_are_plain_arithmetic() -> None:
    """What the bench compares its runs with: each bucket's first minute at once, then its refill
    (openai's 4,000 calls at 300 rpm: 300 at once, 3,700 more in 740 s); and the RSS's growth per
    1,000 items after the first tenth, by least squares."""
    from moa.benchmark.batch_bench import LIMITS, allowed_items_per_s, memory_figures

    assert LIMITS == {"openai": 300, "anthropic": 1000, "gemini": 1000}
    calls = {"openai": 4000, "anthropic": 2000, "gemini": 2000}
    assert allowed_items_per_s(2000, calls) == pytest.approx(2000 / 740)
    assert allowed_items_per_s(100, {"openai": 200}) == math.inf  # within the first burst
    growing = [(t, 10 * t, 200 + 0.02 * 10 * t) for t in range(1, 101)]  # 20 MB per 1,000 items
    assert memory_figures(growing, 1000)["growth_mb_per_1000_items"] == pytest.approx(20.0)
    flat = [(t, 10 * t, 250.0) for t in range(1, 101)]
    figures = memory_figures(flat, 1000)
    assert figures["growth_mb_per_1000_items"] == 0 and figures["rss_mb_at_10pct"] == 250.0


def test_batch_md_shows_the_batch_bench_rendered() -> None:
    """docs/BATCH.md's table is bench-batch.json rendered, and the file says every goal was met
    (a figure edited by hand, or a run that missed one, fails here)."""
    from moa.benchmark.batch_bench import batch_markdown

    root = Path(__file__).resolve().parent.parent
    raw = json.loads((root / "docs" / "bench-batch.json").read_text())
    assert batch_markdown(raw) in (root / "docs" / "BATCH.md").read_text()
    assert raw["goals"] and all(raw["goals"].values()), raw["goals"]


# -- moa bench's local: target (moa serve --local in a process of its own) ------------------------------


def test_the_bench_accepts_local_targets_and_names_the_bad_ones() -> None:
    from moa.cli.bench import _targets

    assert _targets("baseline,local:moa-lite,serve:moa") == ["baseline", "local:moa-lite", "serve:moa"]
    for bad in ("local:", "local", "locals:moa-lite"):
        with pytest.raises(Exception, match="local:MODEL"):
            _targets(bad)


def test_only_serve_targets_the_floor_and_fault_scenarios_start_ray() -> None:
    from moa.benchmark.options import BenchOptions
    from moa.benchmark.runner import needs_ray

    assert not needs_ray(BenchOptions(targets=["baseline", "local:moa-lite"], scenarios=[]))
    assert needs_ray(BenchOptions(targets=["baseline", "local:moa-lite"], scenarios=["hang"]))
    assert needs_ray(BenchOptions(targets=["local:moa-lite", "floor"], scenarios=[]))
    assert needs_ray(BenchOptions(targets=["serve:moa-lite"], scenarios=[]))


async def test_a_local_target_runs_moa_serve_local_in_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--targets baseline,local:MODEL`: the baseline and `moa serve --local` (a child process on
    the bench's simulator, counted in the CPU of the process tree) side by side, with no Ray."""
    import psutil

    from moa.benchmark import runner
    from moa.benchmark.options import BenchOptions

    def no_ray(name: str = "ray") -> Any:
        raise AssertionError("a run of baseline and local targets started Ray")

    monkeypatch.setattr(runner, "ray_targets", no_ray)
    servers: list[list[str]] = []
    started = runner.LocalService.__init__

    def spy(self: runner.LocalService, *a: Any, **k: Any) -> None:
        started(self, *a, **k)
        servers.append(psutil.Process(self.pid).cmdline())

    monkeypatch.setattr(runner.LocalService, "__init__", spy)
    opts = BenchOptions(
        targets=["baseline", "local:single"],
        concurrency=[1],
        requests=2,
        scenarios=[],
        ttft_s=0.01,
        tokens_per_s=2000.0,
        jitter=0.0,
        out=tmp_path,
    )
    report = await runner.run(opts)
    rows = {r["target"]: r for r in report["levels"]}
    assert set(rows) == {"baseline", "local single"}
    local = rows["local single"]
    assert local["ok"] == 2 and local["errors"] == 0
    assert local["overhead_p50_ms"] > 0 and local["cpu_ms_per_request"] > 0
    ((cmd),) = servers
    assert cmd[-6:-3] == ["serve", "--local", "--config"] and cmd[-2] == "--port"
    assert "| local single | 1 |" in (tmp_path / "results.md").read_text()


def test_moa_serve_local_settles_its_heap_once_built(config: MoAConfig) -> None:
    """`moa serve --local`'s server freezes what start-up left (gc.freeze) once it is built, so
    the full collections during requests no longer walk the SDKs' and the app's objects; a server
    inside another program (the tests' ApiServer) leaves that program's collector alone."""
    import gc
    import threading

    from moa.local import LocalServer
    from moa.service import claim_port

    gc.unfreeze()
    try:
        for settle in (False, True):
            server = LocalServer(config, claim_port("127.0.0.1", 0), settle=settle)
            ready = threading.Event()
            thread = threading.Thread(
                target=lambda s=server, r=ready: asyncio.run(s.run(on_ready=lambda _: r.set())), daemon=True
            )
            thread.start()
            assert ready.wait(60)
            frozen = gc.get_freeze_count()
            server.stop()
            thread.join(30)
            assert (frozen > 0) is settle, (settle, frozen)
    finally:
        gc.unfreeze()


def test_the_profiler_finds_moa_serve_local_and_waits_for_its_warm_up() -> None:
    """`python -m moa.benchmark.profile` on a local: target: it finds the `moa serve --local`
    process among the bench's children, and starts sampling only once the server answers and its
    warm-up request (four calls) has reached the simulator, not during start-up."""
    import os

    from moa.benchmark import profile
    from moa.benchmark.runner import LocalService, Simulator, bench_config

    sim = Simulator(0.01, 2000.0, 0.0)
    try:
        local = LocalService(bench_config(sim.url, 30.0))
        try:
            procs = profile.service_processes(os.getpid())
            assert procs == {"local": local.pid}
            assert not profile._load_started(os.getpid(), procs)  # up, no warm-up yet
            body = {"model": "moa-lite", "messages": [{"role": "user", "content": QUESTION}]}
            httpx.post(local.url + "/v1/chat/completions", json=body, timeout=60).raise_for_status()
            assert profile._load_started(os.getpid(), procs)
        finally:
            local.stop()
    finally:
        sim.stop()


def test_a_bench_run_with_a_failure_names_it_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """How ``moa bench --tools`` and ``--structured`` end (``_told``): the table, where the files
    are, and exit 1 naming each failure on stderr (an invalid answer, a broken tool contract);
    exit 0 with none."""
    from moa.cli.bench import _told

    assert _told("| table |", tmp_path, "x.json", []) == 0
    assert _told("| table |", tmp_path, "x.json", ["moa-lite @ 0.3: 1 invalid answers"]) == 1
    out, err = capsys.readouterr()
    assert out.count("| table |") == 2 and f"results in {tmp_path}/ (x.json)" in out
    assert err == "moa bench: moa-lite @ 0.3: 1 invalid answers\n"
