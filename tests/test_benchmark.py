"""A small smoke run of the benchmark harness, to keep it working (no performance assertion)."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from moa.benchmark.baseline import Baseline
from moa.benchmark.runner import HttpTarget, ProcessTree, load_prompts, run_level, write_report
from moa.benchmark.stats import Sample, percentile, summarize
from moa.config import MoAConfig
from moa.simulator.server import SimulatorServer
from tests.test_api import _Server, set_fault


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
    with _Server(config) as server:
        target = HttpTarget(server.url, "moa-lite")
        sample = asyncio.run(target.send("How does a compiler work?"))
        assert sample.ok and sample.met_quorum and sample.simulated_s and sample.overhead_s is not None
        assert 0 < sample.overhead_s < sample.e2e_s and not sample.cut_straggler
        # A hanging proposer is cut after quorum + grace: that wait is not counted as overhead.
        # (A new target: the first one's connection pool belongs to the closed event loop.)
        set_fault(sim, "gemini-2.5-flash", hang={"rate": 1.0})
        cut = asyncio.run(HttpTarget(server.url, "moa-lite").send("How does a compiler work?"))
    assert cut.ok and cut.met_quorum and cut.cut_straggler and cut.overhead_s is None
