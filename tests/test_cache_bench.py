"""``moa bench --cache`` end to end on a fast simulator: repeats are exact hits, and the report
adds up."""

from __future__ import annotations

from pathlib import Path

from moa.cli import main


def test_cache_bench_reports_hits_latency_and_savings(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--cache", "--requests", "3", "--ttft", "0.01", "--tps", "5000", "--jitter", "0"]
    assert main([*args, "--out", str(out)]) == 0
    import json

    report = json.loads((out / "cache.json").read_text())
    assert report["latency"]["miss"]["n"] == 3
    assert report["latency"]["hit-exact"]["n"] == 3  # every repeat
    assert report["hit_rate"] == 0.5
    assert report["saved_usd"] > 0 and report["paid_usd"] > 0
    assert report["latency"]["hit-exact"]["p50_ms"] < report["latency"]["miss"]["p50_ms"]
    assert "hit-exact" in (out / "cache.md").read_text()
