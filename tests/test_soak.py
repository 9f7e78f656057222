"""``moa bench --soak``: the verdict rule on series whose trend is known, the sampler on real
processes, and a short soak of ``moa serve --local`` whose samples must be the server's own."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import psutil
import pytest

from moa.benchmark.soak import SoakOptions, grew, process_sample, run_soak, soak_markdown, trend
from moa.cli.main import main

DOCS = Path(__file__).parent.parent / "docs"

TIMES = [10.0 * i for i in range(61)]  # ten minutes, a sample every 10 s


def _noisy(level: float, per_s: float, noise: float, seed: int) -> list[float]:
    rnd = random.Random(seed)
    return [level + per_s * t + rnd.uniform(-noise, noise) for t in TIMES]


def test_a_series_that_keeps_growing_is_called_growing() -> None:
    """RSS leaking 3 MB a minute under ±2 MB of noise, and a task count gaining one a minute
    under ±3: both grow over the second half by more than their noise."""
    rss = trend(TIMES, _noisy(400.0, 0.05, 2.0, seed=1))
    assert rss["verdict"] == "grows", rss
    assert rss["growth"] == pytest.approx(15.0, abs=2.0)
    assert rss["slope_per_min"] == pytest.approx(3.0, abs=0.4)
    tasks = trend(TIMES, _noisy(40.0, 1 / 60, 3.0, seed=2))
    assert tasks["verdict"] == "grows", tasks


def test_a_level_series_is_flat_whatever_its_warm_up_did() -> None:
    """A level series with noise is flat; so is one that climbed 80 MB in the first half (pools
    and caches filling) and then stayed level: only the second half is judged."""
    for seed in range(20):
        flat = trend(TIMES, _noisy(400.0, 0.0, 4.0, seed=seed))
        assert flat["verdict"] == "flat", (seed, flat)
    warmed = [min(320.0 + t / 2, 400.0) + random.Random(t).uniform(-1, 1) for t in TIMES]
    got = trend(TIMES, warmed)
    assert got["verdict"] == "flat" and got["min"] < 322 and got["max"] > 399, got
    assert trend(TIMES[:6], [1.0, 2, 3, 4, 5, 6])["verdict"] == "too few samples"


def test_a_soak_names_what_grew_and_what_failed() -> None:
    """What makes `moa bench --soak` exit 1: each measure that grew, by process, and failed
    requests; a flat run with none failed names nothing."""
    level = _noisy(400.0, 0.0, 2.0, seed=3)
    leaking = _noisy(400.0, 0.05, 2.0, seed=1)
    run = {"target": "local moa-lite", "ok": 90, "errors": 0}
    flat = {"runs": [{**run, "series": {"local": {"rss_mb": trend(TIMES, level)}}}]}
    assert grew(flat) == []
    leak = {"runs": [{**run, "errors": 2, "series": {"local": {"rss_mb": trend(TIMES, leaking)}}}]}
    assert [line.split(" grew ")[0] for line in grew(leak)[:1]] == ["local moa-lite: local RSS MB"]
    assert grew(leak)[1] == "local moa-lite: 2 of 92 requests failed"


def test_a_process_is_read_from_outside_as_it_is() -> None:
    """A socket opened here is one more socket and descriptor; 64 MB written is in the RSS."""
    me = psutil.Process().pid
    before = process_sample(me)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        after = process_sample(me)
    assert after["sockets"] == before["sockets"] + 1 and after["fds"] >= before["fds"] + 1
    assert after["rss_mb"] - before["rss_mb"] > 48
    del block


async def test_a_short_soak_samples_the_local_server_itself(tmp_path: Path) -> None:
    """Two seconds of load at concurrency 4 on `moa serve --local` (a fast simulator): the
    samples are the server process's, read while the load ran (its clients' sockets open, its
    event loop holding the requests' tasks, more than once the load has stopped), and the
    report renders them."""
    opts = SoakOptions(
        target="local:single",
        duration_s=2.0,
        sample_every_s=0.25,
        concurrency=4,
        ttft_s=0.05,
        tokens_per_s=2000.0,
        jitter=0.0,
    )
    report = await run_soak(opts, lambda _: None)
    (run,) = report["runs"]
    assert run["ok"] > 8 and run["errors"] == 0  # (two seconds are all warm-up: no verdict asked)
    samples = run["samples"]
    assert len(samples) >= 8 and [s["requests_done"] for s in samples] == sorted(
        s["requests_done"] for s in samples
    )
    loaded = [s["processes"]["local"] for s in samples[1:-1]]
    assert all(s["loaded"] for s in samples[:-1]) and not samples[-1]["loaded"]
    idle = samples[-1]["processes"]["local"]
    assert run["series"]["local"]["asyncio_tasks"]["at_rest"] == idle["asyncio_tasks"]
    # The listening socket and the four clients' connections (kept alive between requests).
    assert all(p["sockets"] >= 5 for p in loaded), loaded
    assert all(30 < p["rss_mb"] < 2000 for p in loaded)
    assert max(p["asyncio_tasks"] for p in loaded) > idle["asyncio_tasks"] >= 1, samples
    assert set(run["series"]["local"]) == {"rss_mb", "fds", "sockets", "asyncio_tasks"}
    assert "| local: asyncio tasks |" in soak_markdown(report)


def test_a_soak_is_one_level_on_one_served_target(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--concurrency", "8,32"],
        ["--targets", "baseline"],
        ["--targets", "local:single,local:moa-lite"],
        ["--sample-every", "20"],
    ):
        assert main(["bench", "--soak", "60", *argv]) == 2, argv
    assert "one level on one target" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name",
    [
        "bench-soak-local.json",
        "bench-soak-serve.json",
        "bench-soak-serve-15min.json",
        "bench-soak-serve-15min-2.json",
    ],
)
def test_benchmarks_md_shows_the_soak_rendered(name: str) -> None:
    """The soak tables on the page are ``soak_markdown`` of the committed raw file."""
    doc = (DOCS / "BENCHMARKS.md").read_text()
    assert f"]({name})" in doc, f"BENCHMARKS.md never links its raw file {name}"
    table = soak_markdown(json.loads((DOCS / name).read_text())).strip()
    assert table in doc, f"BENCHMARKS.md does not show {name} as rendered:\n{table}"
