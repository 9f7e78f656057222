"""``moa bench --batch``: offline batches measured against the simulator, each figure against its
goal (docs/BATCH.md, "Measured").

    moa bench --batch --prompts mt_bench_questions.jsonl [--batch-items 2000] [--out DIR]
    python -m moa.benchmark.batch_bench --synthetic 2000 items.jsonl   # the synthetic set alone

Every part runs ``moa batch run`` (or ``moa serve --local``) as its own process, as a user would,
against one simulator process whose counters are the invoice:

1. MT-Bench: the questions (their first turn) through ``--preset moa-lite``, in-process: items/s,
   cost, errors.
2. Throughput: a synthetic set (``synthetic_items``, ``--batch-items``, 2,000 by default) against
   the providers' RPM limits (``LIMITS``, set so that they bind): items/s against what the limits
   allow for the calls the run made (goal: within 10%).
3. Memory: the resident set of that run's process, sampled over the run (goal: flat).
4. Resume: a run killed with SIGKILL halfway, then run again: items paid twice and items lost,
   from the simulator's counts (goal: 0 and 0).
5. Interactive latency: the p50 of interactive moa-lite requests to ``moa serve --local``, idle,
   while ``moa batch run --url`` runs at the limits (its requests marked as batch work), and, for
   contrast, while the same batch runs unmarked (goal: the first two within 10%).

The machine's load (its load average before and after each part) is in the report: on a shared
machine a figure that looks off is measured again before it is believed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from moa.batch.items import read_items
from moa.batch.journal import Journal, read_outcomes
from moa.batch.runner import BatchRunner
from moa.batch.senders import ServiceSender
from moa.benchmark.runner import _free_port
from moa.benchmark.stats import percentile

# Requests per minute of each provider account, in the range of the providers' lower paid tiers
# (OpenAI's tier 1 allows 500 RPM for gpt-4.1; Anthropic's tier 2 and Gemini's tier 1, about 1,000).
# OpenAI's, which serves moa-lite's aggregator and one proposer, binds: low enough that the
# machine, not only the limit, keeps up with what it allows. No TPM limit: with RPM alone binding,
# what the limits allow is plain arithmetic.
LIMITS = {"openai": 300, "anthropic": 1000, "gemini": 1000}
# The simulator's models: realistic first-token time and speed, answers of 100 to 250 tokens.
PROFILE = {"default": {"ttft_s": 0.5, "tokens_per_s": 80.0, "jitter": 0.1, "output_tokens": [100, 250]}}
PRESET = "moa-lite"
AGGREGATOR_MODEL = "gpt-4.1"  # moa-lite's aggregator: one completed call per answered item
# Items in flight for the throughput runs: enough that the limits, not the concurrency, bind
# (moa-lite takes about 10 s an item here, its calls' wait for the budget aside; the limits allow
# 2.5 to 5 items a second, as its openai proposer is or is not cut after the grace).
CONCURRENCY = 96
RESUME_ITEMS = 400
PROBES = 25  # interactive requests per condition, one at a time
PROBE_GAP_S = 0.5
# Items the batch finishes before the interactive requests are timed: past the buckets' initial
# burst (300 openai calls, 150 to 300 items), so the limits bind while they are.
WARM_ITEMS = 400

TOPICS = [
    "the water cycle", "compound interest", "photosynthesis", "the French Revolution",
    "TCP congestion control", "plate tectonics", "the immune system", "supply and demand",
    "black holes", "the printing press",
    "vaccination", "binary search", "inflation", "the Roman Republic", "climate feedback loops",
    "public-key cryptography", "the nitrogen cycle", "the Industrial Revolution", "neural networks",
    "ocean currents",
]  # fmt: skip
ASKS = [
    "Explain {t} to a curious twelve-year-old.",
    "What are the three most common misconceptions about {t}?",
    "Summarise {t} in one paragraph, then give one surprising fact.",
    "How would you teach {t} in a fifteen-minute lesson?",
    "Write a short FAQ (three questions) about {t}.",
    "Compare two competing explanations of {t}.",
    "What would change in everyday life without {t}?",
    "Give a worked example that illustrates {t}.",
]


def synthetic_items(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct questions (each asked once: no answer is shared), as batch input lines."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ask = rng.choice(ASKS).format(t=rng.choice(TOPICS))
        rows.append({"custom_id": f"syn-{i}", "prompt": f"Question {i}. {ask}"})
    return rows


def mt_bench_items(path: Path) -> list[dict[str, str]]:
    """MT-Bench's questions (or any ``{"prompt"}`` / ``{"turns"}`` JSONL), the first turn of each."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            qid = row.get("question_id", n)
            rows.append(
                {"custom_id": f"mt-{qid}", "prompt": row["prompt"] if "prompt" in row else row["turns"][0]}
            )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the processes ----------------------------------------------------------------------------------


class Bench:
    """The simulator, the config the runs share, and the environment their processes get."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        profile = write_text(tmp / "profile.yaml", yaml.safe_dump(PROFILE))
        port = _free_port()
        self.sim_url = f"http://127.0.0.1:{port}"
        self.env = os.environ | {
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "MOA_STATE_DIR": str(tmp / "state"),
        }
        for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "MOA_CONFIG"):
            self.env.pop(key, None)
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "simulate", "--port", str(port), "--profile", str(profile)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_up(self.sim_url + "/admin/stats", self.sim)
        config = {
            "simulator": {"mode": "on", "url": self.sim_url},
            "providers": {name: {"limits": {"rpm": rpm, "tpm": None}} for name, rpm in LIMITS.items()},
            # moa batch run --url's requests pass the service's batch gate: room for all of them.
            "batch": {"concurrency": 64},
        }
        self.config = write_text(tmp / "moa.yaml", yaml.safe_dump(config))

    def reset(self) -> None:
        httpx.post(self.sim_url + "/admin/reset", json={"profile": PROFILE}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        models: dict[str, Any] = httpx.get(self.sim_url + "/admin/stats").json()["models"]
        return models

    def batch(self, src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
        """``moa batch run`` in a process of its own; what it prints goes to files beside ``out``
        (a pipe nobody reads while it runs could fill and stop it)."""
        args = ["batch", "run", str(src), "--out", str(out), "--preset", PRESET, "--no-progress"]
        with out.with_suffix(".stdout").open("w") as stdout, out.with_suffix(".stderr").open("w") as stderr:
            return subprocess.Popen(
                [sys.executable, "-m", "moa.cli", *args, "--config", str(self.config), *extra],
                env=self.env,
                stdout=stdout,
                stderr=stderr,
                text=True,
            )

    def close(self) -> None:
        self.sim.terminate()
        self.sim.wait(10)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wait_up(url: str, proc: subprocess.Popen[Any], within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before it answered")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {within_s:g} s")


def _summary(proc: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    """The summary ``moa batch run`` printed, once it has exited."""
    proc.wait()
    if proc.returncode not in (0, 1):
        err = out.with_suffix(".stderr").read_text()[-2000:]
        raise RuntimeError(f"moa batch run exited with {proc.returncode}: {err}")
    summary: dict[str, Any] = json.loads(out.with_suffix(".stdout").read_text())
    return summary


def _done(out: Path) -> int:
    """Items an output holds so far: its whole lines (cheap enough to look at twice a second)."""
    try:
        return out.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _by_provider(stats: dict[str, Any]) -> dict[str, int]:
    """The calls the simulator received, by provider (the bundled models' names say whose)."""
    owner = {"gpt": "openai", "claude": "anthropic", "gemini": "gemini"}
    calls: dict[str, int] = {}
    for model, s in stats.items():
        provider = next((p for prefix, p in owner.items() if model.startswith(prefix)), model)
        calls[provider] = calls.get(provider, 0) + int(s["requests"])
    return calls


def allowed_items_per_s(items: int, calls: dict[str, int]) -> float:
    """What the RPM limits allow for a run that made ``calls``: each bucket starts full (a
    minute's worth at once), then refills at ``rpm / 60`` a second; the run can end no sooner than
    its slowest provider has been granted its calls."""
    seconds = max(max(0, n - LIMITS[p]) / (LIMITS[p] / 60) for p, n in calls.items() if p in LIMITS)
    return items / seconds if seconds > 0 else float("inf")


# -- the parts ----------------------------------------------------------------------------------------


def run_mt_bench(bench: Bench, prompts: Path) -> dict[str, Any]:
    rows = mt_bench_items(prompts)
    src = write_jsonl(bench.tmp / "mt_bench.jsonl", rows)
    bench.reset()
    load = _load()
    out = bench.tmp / "mt_bench.out.jsonl"
    summary = _summary(bench.batch(src, out, "--concurrency", str(CONCURRENCY)), out)
    return {
        "items": summary["total"],
        "answered": summary["succeeded"],
        "errors": summary["errors"],
        "seconds": summary["seconds"],
        "items_per_s": round(summary["total"] / summary["seconds"], 3),
        "cost_usd": summary["cost_usd"],
        "cost_per_item_usd": round(summary["cost_usd"] / max(1, summary["total"]), 6),
        "calls": _by_provider(bench.stats()),
        "load_before": load,
        "load_after": _load(),
    }


def run_throughput(bench: Bench, n: int) -> dict[str, Any]:
    """The synthetic set at the limits, its process's RSS and progress sampled every half second."""
    src = write_jsonl(bench.tmp / "synthetic.jsonl", synthetic_items(n))
    out = bench.tmp / "synthetic.out.jsonl"
    bench.reset()
    load = _load()
    proc = bench.batch(src, out, "--concurrency", str(CONCURRENCY))
    ps = psutil.Process(proc.pid)
    t0 = time.monotonic()
    samples: list[tuple[float, int, float]] = []
    cpu_s = 0.0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            rss = ps.memory_info().rss / 2**20
            samples.append((round(time.monotonic() - t0, 1), _done(out), round(rss, 1)))
            times = ps.cpu_times()
            cpu_s = times.user + times.system
        time.sleep(0.5)
    summary = _summary(proc, out)
    calls = _by_provider(bench.stats())
    allowed = allowed_items_per_s(n, calls)
    measured = n / summary["seconds"]
    return {
        "items": n,
        "answered": summary["succeeded"],
        "errors": summary["errors"],
        "seconds": summary["seconds"],
        "items_per_s": round(measured, 3),
        "allowed_items_per_s": round(allowed, 3),
        "of_allowed": round(measured / allowed, 3),
        "calls": calls,
        "cost_usd": summary["cost_usd"],
        # The batch process's CPU (its API app, engine and provider clients: it runs in-process).
        "cpu_s": round(cpu_s, 1),
        "cpu_ms_per_item": round(1000 * cpu_s / n, 1),
        "memory": memory_figures(samples, n),
        "load_before": load,
        "load_after": _load(),
    }


def memory_figures(samples: list[tuple[float, int, float]], n: int) -> dict[str, Any]:
    """The RSS once a tenth of the items are done (start-up over) and at the end, its peak, and
    its growth per 1,000 items in between (a least-squares slope): flat means about 0."""
    after = [(done, rss) for _, done, rss in samples if done >= n // 10]
    if len(after) < 2:
        return {"samples": len(samples)}
    xs, ys = [d for d, _ in after], [r for _, r in after]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {
        "rss_mb_at_10pct": after[0][1],
        "rss_mb_at_end": after[-1][1],
        "rss_mb_peak": max(r for _, _, r in samples),
        "rss_mb_start": samples[0][2],
        "growth_mb_per_1000_items": round(slope * 1000, 2),
        "samples": len(samples),
    }


def _settled(bench: Bench, within_s: float = 30.0) -> dict[str, Any]:
    """The simulator's counts once no call is in flight any more (a killed client's calls end at
    the simulator a moment after it dies)."""
    deadline = time.monotonic() + within_s
    stats = bench.stats()
    while any(s["in_flight"] for s in stats.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = bench.stats()
    return stats


def _aggregated(stats: dict[str, Any]) -> int:
    return int(stats.get(AGGREGATOR_MODEL, {}).get("completed", 0))


def run_resume(bench: Bench, n: int) -> dict[str, Any]:
    """Killed (SIGKILL) once half the items are written, then the same command again. An item's
    answer is paid for in full when its aggregator call completes (moa-lite: one per item), so
    the simulator's completed aggregator calls say which answers were paid for in each run."""
    rows = [r | {"custom_id": f"resume-{i}"} for i, r in enumerate(synthetic_items(n, seed=1))]
    src = write_jsonl(bench.tmp / "resume.jsonl", rows)
    out = bench.tmp / "resume.out.jsonl"
    bench.reset()
    load = _load()
    first = bench.batch(src, out, "--concurrency", str(CONCURRENCY))
    while first.poll() is None and _done(out) < n // 2:
        time.sleep(0.05)
    if first.poll() is not None:
        raise RuntimeError("the batch finished before it could be killed")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    before = len(read_outcomes(out)[0])
    at_kill = _settled(bench)
    again = _summary(bench.batch(src, out, "--concurrency", str(CONCURRENCY)), out)
    stats = _settled(bench)
    outcomes = read_outcomes(out)[0]
    ids = [o.custom_id for o in outcomes]
    answered = {o.custom_id for o in outcomes if o.ok}
    first_run, second_run = _aggregated(at_kill), _aggregated(stats) - _aggregated(at_kill)
    return {
        "items": n,
        "done_at_kill": before,
        "answered_after_resume": len(answered),
        "lines": len(ids),
        "written_twice": len(ids) - len(set(ids)),
        "lost": n - len(answered),
        # The second run must pay for exactly the items the output did not hold: any more is an
        # item that was done (written) and paid for again.
        "paid_twice": second_run - (n - before),
        # Answers the providers had finished when the process died but it had not written yet
        # (in flight between the last token and the line's fsync): they run again, so their
        # cost is paid twice; at most the items in flight.
        "finished_not_written_at_kill": first_run - before,
        "aggregator_completed": {"first_run": first_run, "second_run": second_run},
        "requests": sum(int(s["requests"]) for s in stats.values()),
        "errors": again["errors"],
        "load_before": load,
        "load_after": _load(),
    }


async def _probe(url: str, n: int) -> list[float]:
    """``n`` interactive moa-lite requests one at a time (the same questions for every condition):
    their latencies, in seconds; a request that fails raises."""
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for k in range(n):
            body = {
                "model": PRESET,
                "messages": [{"role": "user", "content": f"Interactive question {k}: why is the sky blue?"}],
            }
            t0 = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            times.append(time.perf_counter() - t0)
            response.raise_for_status()
            await asyncio.sleep(PROBE_GAP_S)
    return times


@contextlib.contextmanager
def _served(bench: Bench) -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moa.cli",
            "serve",
            "--local",
            "--port",
            str(port),
            "--config",
            str(bench.config),
        ],
        env=bench.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url + "/healthz", server)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def _during(bench: Bench, url: str, marked: bool) -> dict[str, Any]:
    """The interactive requests while a batch runs at the limits on the same service: marked as
    batch work (``moa batch run --url``), or the same runner's requests unmarked."""
    name = "marked" if marked else "unmarked"
    src = write_jsonl(bench.tmp / f"load-{name}.jsonl", synthetic_items(3000, seed=2))
    out = bench.tmp / f"load-{name}.out.jsonl"
    if marked:
        proc = bench.batch(src, out, "--concurrency", str(CONCURRENCY), "--url", url)
    else:
        drive = ["--drive", url, str(src), str(out), str(CONCURRENCY)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "moa.benchmark.batch_bench", *drive],
            env=bench.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    try:
        deadline = time.monotonic() + 180
        while _done(out) < WARM_ITEMS and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} batch stopped: {proc.returncode}")
            time.sleep(0.2)
        done0, t0 = _done(out), time.monotonic()
        times = asyncio.run(_probe(url, PROBES))
        done1, t1 = _done(out), time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    outcomes = read_outcomes(out)[0]
    return {
        "p50_s": round(percentile(times, 50), 3),
        "p95_s": round(percentile(times, 95), 3),
        "latencies_s": [round(t, 3) for t in times],
        "batch_items_per_s": round((done1 - done0) / (t1 - t0), 3),
        "batch_errors": sum(not o.ok for o in outcomes),
    }


def run_interactive(bench: Bench) -> dict[str, Any]:
    load = _load()
    bench.reset()
    with _served(bench) as url:
        asyncio.run(_probe(url, 2))  # warm-up: connections, the SDK clients
        idle = asyncio.run(_probe(url, PROBES))
        marked = _during(bench, url, marked=True)
    with _served(bench) as url:
        asyncio.run(_probe(url, 2))
        unmarked = _during(bench, url, marked=False)
    p50 = percentile(idle, 50)
    return {
        "probes": PROBES,
        "idle": {
            "p50_s": round(p50, 3),
            "p95_s": round(percentile(idle, 95), 3),
            "latencies_s": [round(t, 3) for t in idle],
        },
        "batch_marked": marked,
        "batch_unmarked": unmarked,
        "marked_over_idle": round(marked["p50_s"] / p50, 3),
        "unmarked_over_idle": round(unmarked["p50_s"] / p50, 3),
        "load_before": load,
        "load_after": _load(),
    }


def run_batch_bench(prompts: Path, items: int) -> dict[str, Any]:
    started = time.time()
    machine: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_at_start": _load(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
    }
    with tempfile.TemporaryDirectory(prefix="moa-bench-batch-") as tmp:
        bench = Bench(Path(tmp))
        try:
            result = {
                "machine": machine,
                "setup": {
                    "preset": PRESET,
                    "rpm_limits": LIMITS,
                    "simulator_profile": PROFILE["default"],
                    "concurrency": CONCURRENCY,
                    "prompts": prompts.name,
                },
                "mt_bench": run_mt_bench(bench, prompts),
                "throughput": run_throughput(bench, items),
                "resume": run_resume(bench, RESUME_ITEMS),
                "interactive": run_interactive(bench),
            }
        finally:
            bench.close()
    machine["load_at_end"] = _load()
    machine["minutes"] = round((time.time() - started) / 60, 1)
    result["goals"] = goals(result)
    return result


def goals(r: dict[str, Any]) -> dict[str, bool]:
    m = r["throughput"]["memory"]
    return {
        "throughput_within_10pct_of_limits": r["throughput"]["of_allowed"] >= 0.9,
        "memory_flat": abs(m.get("growth_mb_per_1000_items", 0.0)) < 5.0,
        "resume_paid_twice_0": r["resume"]["paid_twice"] == 0,
        "resume_lost_0": r["resume"]["lost"] == 0,
        "interactive_p50_within_10pct": r["interactive"]["marked_over_idle"] <= 1.10,
    }


def batch_markdown(r: dict[str, Any]) -> str:
    mt, tp, rs, it = r["mt_bench"], r["throughput"], r["resume"], r["interactive"]
    m = tp["memory"]
    mt_row = (
        f"{mt['items']} items in {mt['seconds']:.1f} s: {mt['items_per_s']:.2f} items/s, "
        f"${mt['cost_usd']:.4f} (${mt['cost_per_item_usd']:.5f} an item), errors: {mt['errors'] or 'none'}"
    )
    tp_row = (
        f"{tp['items']} items in {tp['seconds']:.0f} s: {tp['items_per_s']:.2f} items/s; the limits "
        f"allow {tp['allowed_items_per_s']:.2f} ({100 * tp['of_allowed']:.0f}%), "
        f"errors: {tp['errors'] or 'none'}"
    )
    rss_row = (
        f"{m.get('rss_mb_at_10pct')} MB at 10% done, {m.get('rss_mb_at_end')} MB at the end (peak "
        f"{m.get('rss_mb_peak')}); {m.get('growth_mb_per_1000_items')} MB per 1,000 items"
    )
    resume_row = (
        f"killed at {rs['done_at_kill']} of {rs['items']}: done items paid twice {rs['paid_twice']}, "
        f"lost {rs['lost']}, written twice {rs['written_twice']}; in flight and finished but not "
        f"yet written: {rs['finished_not_written_at_kill']}"
    )
    idle, marked, unmarked = it["idle"], it["batch_marked"], it["batch_unmarked"]
    it_row = (
        f"idle {idle['p50_s']:.2f} s; beside the batch {marked['p50_s']:.2f} s "
        f"({it['marked_over_idle']:.2f}x); beside it unmarked {unmarked['p50_s']:.2f} s "
        f"({it['unmarked_over_idle']:.2f}x)"
    )
    rows = [
        ("MT-Bench, moa-lite", mt_row, "-"),
        ("Synthetic set at the RPM limits", tp_row, "within 10%"),
        ("RSS of the batch process", rss_row, "flat"),
        ("Resume after SIGKILL", resume_row, "0, 0"),
        ("Interactive p50 (moa-lite)", it_row, "within 10%"),
    ]
    lines = ["| What | Measured | Goal |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    machine = r["machine"]
    met = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["goals"].items())
    lines += [
        "",
        f"{machine['cpus']} CPUs, load average {machine['load_at_start']} at the start and "
        f"{machine['load_at_end']} at the end; {machine['minutes']} minutes. Goals met: {met}",
    ]
    return "\n".join(lines)


def write_batch_report(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "batch.md").write_text(batch_markdown(r) + "\n")


# -- the unmarked batch of the contrast (run as a process of its own) -------------------------------


async def drive(url: str, src: Path, out: Path, concurrency: int) -> None:
    """The batch runner over a service, its requests unmarked: interactive requests to the service,
    as any client's would be. For the contrast only; ``moa batch run --url`` marks them."""
    journal = Journal(out)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            runner = BatchRunner(
                read_items(src, PRESET), journal, ServiceSender(client), concurrency=concurrency
            )
            await runner.run()
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moa.benchmark.batch_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--synthetic", nargs=2, metavar=("N", "OUT"), help="write the synthetic set of N items to OUT"
    )
    p.add_argument("--drive", nargs=4, metavar=("URL", "IN", "OUT", "CONCURRENCY"), help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=Path, help="MT-Bench questions JSONL (moa bench --batch)")
    p.add_argument("--batch-items", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    if args.synthetic:
        write_jsonl(Path(args.synthetic[1]), synthetic_items(int(args.synthetic[0])))
        return 0
    if args.drive:
        url, src, out, concurrency = args.drive
        asyncio.run(drive(url, Path(src), Path(out), int(concurrency)))
        return 0
    if args.prompts is None:
        p.error("--prompts (the MT-Bench questions) is required")
    r = run_batch_bench(args.prompts, args.batch_items)
    write_batch_report(r, args.out)
    print(batch_markdown(r))
    return 0 if all(r["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
