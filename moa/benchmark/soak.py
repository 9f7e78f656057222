"""``moa bench --soak SECONDS``: constant load on the service for a long while, its processes
sampled over time, to show whether anything grows that should stay level.

One target at a time (``local:MODEL``, ``moa serve --local`` in a process of its own, or
``serve:MODEL``, the Ray app), at one concurrency: that many clients send requests back to back
until the time is up. Every ``sample_every_s`` seconds each of the service's processes is read
from outside (``psutil``: resident memory, open file descriptors, open TCP/UDP sockets) and the
process answering ``/healthz`` from inside (the tasks on its event loop, which only it can see:
``moa.api.health.process_state``, shown to the admin key, which the bench sets for the service
it starts; it names its pid). On the Ray app the processes are every replica of the app and
Serve's HTTP proxy, each named by its deployment and pid (an autoscaled deployment may start
replicas during the run: their series begin later); the tasks are those of whichever ingress
replica answered ``/healthz``.

Once the load has stopped and every request is answered, each process is sampled once more,
at rest: what it keeps with nothing in flight (tasks back to their idle count, or not).

Each series under load gets a verdict (``trend``): the first half of the run is the warm-up
(pools filling, caches, the allocator's arenas), the second half must be level. A least-squares line through
the second half's samples gives the growth over that half (its slope times its length); the
series is ``flat`` when that growth is within its noise, ``grows`` above it. The noise is the
largest of: twice the spread of the samples around the line (a level series under a moving load
wanders by that much), 1% of the series' median, and one unit (1 MB, one descriptor, one task).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

# What is read of each process, and its unit in the tables.
MEASURES: dict[str, str] = {
    "rss_mb": "RSS MB",
    "fds": "open fds",
    "sockets": "sockets",
    "asyncio_tasks": "asyncio tasks",
}
# The verdict's floors: a series is level if its growth over the second half is within twice
# its spread around the fitted line, or within this share of its median, or within one unit.
NOISE_SPREADS = 2.0
NOISE_SHARE = 0.01
NOISE_UNIT = 1.0
# Fewer samples than this in the second half give no verdict (a line through three points says
# little about a trend).
MIN_SAMPLES = 4


@dataclass
class SoakOptions:
    target: str  # local:MODEL or serve:MODEL
    duration_s: float
    sample_every_s: float = 10.0
    concurrency: int = 32
    ttft_s: float = 0.3
    tokens_per_s: float = 50.0
    jitter: float = 0.1
    layer_deadline_s: float = 30.0
    prompts: Path | None = None


def process_sample(pid: int) -> dict[str, float]:
    """One process read from outside: resident memory, open file descriptors, open sockets
    (TCP and UDP, IPv4 and IPv6: the clients', the providers' and the listening ones)."""
    p = psutil.Process(pid)
    with p.oneshot():
        return {
            "rss_mb": p.memory_info().rss / 2**20,
            "fds": float(p.num_fds()),
            "sockets": float(len(p.net_connections(kind="inet"))),
        }


def trend(times: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
    """A series' first, last, min and max, and its verdict over the second half of the run (see
    the module's docstring): ``growth`` is the fitted line's rise over the second half, ``noise``
    what it is compared with; ``verdict`` is ``flat``, ``grows``, ``falls`` or ``too few samples``."""
    row: dict[str, Any] = {
        "first": values[0],
        "last": values[-1],
        "min": min(values),
        "max": max(values),
        "growth": math.nan,
        "slope_per_min": math.nan,
        "noise": math.nan,
        "verdict": "too few samples",
    }
    half = (times[0] + times[-1]) / 2
    pts = [(t, v) for t, v in zip(times, values, strict=True) if t >= half]
    if len(pts) < MIN_SAMPLES:
        return row
    ts, vs = [t for t, _ in pts], [v for _, v in pts]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    var_t = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (v - mv) for t, v in pts) / var_t if var_t else 0.0
    spread = statistics.pstdev([v - (mv + slope * (t - mt)) for t, v in pts])
    growth = slope * (ts[-1] - ts[0])
    noise = max(NOISE_SPREADS * spread, NOISE_SHARE * abs(statistics.median(vs)), NOISE_UNIT)
    verdict = "grows" if growth > noise else "falls" if growth < -noise else "flat"
    return {**row, "growth": growth, "slope_per_min": 60 * slope, "noise": noise, "verdict": verdict}


def summarize_samples(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per process and measure, the ``trend`` of the samples taken under load, and ``at_rest``:
    the sample taken once the load had stopped and every request was answered (what a process
    keeps when nothing is in flight; a process missing from a sample, or a measure it does not
    have, is skipped there)."""
    names = dict.fromkeys(n for s in samples for n in s["processes"])
    loaded = [s for s in samples if s.get("loaded", True)]
    rest: dict[str, dict[str, float]] = next(
        (s["processes"] for s in reversed(samples) if not s.get("loaded", True)), {}
    )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        out[name] = {}
        for measure in MEASURES:
            pts = [
                (s["t"], s["processes"][name][measure])
                for s in loaded
                if measure in s["processes"].get(name, {})
            ]
            if pts:
                row = trend([t for t, _ in pts], [v for _, v in pts])
                row["at_rest"] = rest.get(name, {}).get(measure, math.nan)
                out[name][measure] = row
    return out


def grew(report: dict[str, Any]) -> list[str]:
    """One line per process and measure that grew over the second half: a soak that finds one
    exits 1 (as a request that failed does)."""
    lines = []
    for run in report["runs"]:
        for name, measures in run["series"].items():
            for measure, t in measures.items():
                if t["verdict"] == "grows":
                    lines.append(
                        f"{run['target']}: {name} {MEASURES[measure]} grew {t['growth']:.1f} over the "
                        f"second half (noise {t['noise']:.1f})"
                    )
        if run["errors"]:
            lines.append(f"{run['target']}: {run['errors']} of {run['ok'] + run['errors']} requests failed")
    return lines


class Sampler:
    """Samples the service's processes every ``every_s`` seconds while the load runs."""

    def __init__(
        self,
        processes: Callable[[], dict[str, int]],
        health_url: str,
        admin_key: str,
        every_s: float,
    ) -> None:
        self.processes, self.every_s = processes, every_s
        self.health_url, self.admin_key = health_url, admin_key
        self.samples: list[dict[str, Any]] = []

    async def tasks(self, client: httpx.AsyncClient) -> tuple[int, int] | None:
        """The pid of the process that answered ``/healthz`` and its event loop's tasks (the admin
        key's view)."""
        try:
            r = await client.get(self.health_url, headers={"Authorization": f"Bearer {self.admin_key}"})
            state = r.json()["process"]
            return int(state["pid"]), int(state["asyncio_tasks"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def sample(self, client: httpx.AsyncClient, t: float, done: int, loaded: bool = True) -> None:
        procs: dict[str, dict[str, float]] = {}
        pids = await asyncio.to_thread(self.processes)
        for name, pid in pids.items():
            try:
                procs[name] = await asyncio.to_thread(process_sample, pid)
            except psutil.Error:
                continue
        answered = await self.tasks(client)
        if answered is not None:
            for name, pid in pids.items():
                if pid == answered[0] and name in procs:
                    procs[name]["asyncio_tasks"] = float(answered[1])
        self.samples.append({"t": round(t, 2), "requests_done": done, "loaded": loaded, "processes": procs})

    async def run(self, t0: float, done: Callable[[], int], stop: asyncio.Event) -> None:
        """Sample at once, then every ``every_s`` on the clock from ``t0`` (however long a sample
        took) until ``stop``; then once more, at rest."""
        async with httpx.AsyncClient(timeout=10) as client:
            k = 0
            while not stop.is_set():
                await self.sample(client, time.monotonic() - t0, done())
                k += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(t0 + k * self.every_s - time.monotonic(), 0.0))
            await self.sample(client, time.monotonic() - t0, done(), loaded=False)


async def constant_load(
    send: Callable[[str], Awaitable[Any]],
    prompts: Sequence[str],
    concurrency: int,
    until: float,
    counts: dict[str, Any],
) -> None:
    """``concurrency`` clients, each sending its next request as soon as its last is answered,
    until the monotonic clock reaches ``until``; ``counts`` keeps ok, errors and their kinds."""

    async def client(k: int) -> None:
        i = k
        while time.monotonic() < until:
            sample = await send(prompts[i % len(prompts)])
            i += concurrency
            if sample.ok:
                counts["ok"] += 1
            else:
                counts["errors"] += 1
                kinds = counts["error_kinds"]
                kinds[sample.error] = kinds.get(sample.error, 0) + 1

    await asyncio.gather(*(client(k) for k in range(concurrency)))


@contextlib.contextmanager
def admin_key_env() -> Iterator[str]:
    """A random admin key in this process's environment while the service starts (the local
    server and Ray's replicas inherit it), so the soak can read ``/healthz``'s process detail."""
    saved = os.environ.get("MOA_ADMIN_KEY")
    key = secrets.token_urlsafe(32)
    os.environ["MOA_ADMIN_KEY"] = key
    try:
        yield key
    finally:
        if saved is None:
            os.environ.pop("MOA_ADMIN_KEY", None)
        else:
            os.environ["MOA_ADMIN_KEY"] = saved


async def soak_one(
    url: str,
    model: str,
    processes: Callable[[], dict[str, int]],
    kind: str,
    admin_key: str,
    opts: SoakOptions,
    prompts: Sequence[str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The load on one running service for the duration, sampled; its warm-up request first."""
    from moa.benchmark.runner import HttpTarget

    target = HttpTarget(url, model)
    await target.send(prompts[0])
    counts: dict[str, Any] = {"ok": 0, "errors": 0, "error_kinds": {}}
    sampler = Sampler(processes, url + "/healthz", admin_key, opts.sample_every_s)
    stop = asyncio.Event()
    t0 = time.monotonic()
    watcher = asyncio.create_task(sampler.run(t0, lambda: counts["ok"] + counts["errors"], stop))

    async def progress() -> None:
        while True:
            await asyncio.sleep(60)
            last = sampler.samples[-1] if sampler.samples else None
            rss = ", ".join(
                f"{n} {p['rss_mb']:.0f} MB" for n, p in (last["processes"] if last else {}).items()
            )
            say(f"  {time.monotonic() - t0:.0f} s: {counts['ok']} ok, {counts['errors']} errors; {rss}")

    ticker = asyncio.create_task(progress())
    try:
        await constant_load(target.send, prompts, opts.concurrency, t0 + opts.duration_s, counts)
    finally:
        wall = time.monotonic() - t0
        ticker.cancel()
        stop.set()
        await watcher
        await target.client.aclose()
    return {
        "target": f"{kind} {model}",
        "concurrency": opts.concurrency,
        "duration_s": round(wall, 1),
        "sample_every_s": opts.sample_every_s,
        "ok": counts["ok"],
        "errors": counts["errors"],
        "error_kinds": counts["error_kinds"],
        "rps": counts["ok"] / wall if wall else math.nan,
        "samples": sampler.samples,
        "series": summarize_samples(sampler.samples),
    }


async def run_soak(opts: SoakOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """One target under constant load for ``opts.duration_s``: the simulator and the service
    started here (on a fresh state, as every bench run), stopped at the end."""
    from moa.benchmark.profile import every_service_process
    from moa.benchmark.runner import (
        LocalService,
        Simulator,
        _free_port,
        bench_config,
        environment,
        load_prompts,
        own_state,
        ray_targets,
    )

    kind, model = opts.target.split(":", 1)
    prompts = load_prompts(opts.prompts)
    targets = ray_targets() if kind == "serve" else None
    report: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "environment": environment(),
        "runs": [],
    }
    me = os.getpid()
    with own_state(None), admin_key_env() as admin_key:
        # The local server starts while the simulator does (it needs its URL, not its answers).
        sim = Simulator(opts.ttft_s, opts.tokens_per_s, opts.jitter, wait=False)
        try:
            cfg = bench_config(sim.url, opts.layer_deadline_s)
            if targets is None:
                local = LocalService(cfg)
                try:
                    sim.ready()
                    say(f"moa serve --local at {local.url} (pid {local.pid}); {opts.duration_s:g} s of load")
                    run = await soak_one(
                        local.url, model, lambda: {"local": local.pid}, "local", admin_key, opts, prompts, say
                    )
                finally:
                    local.stop()
            else:
                sim.ready()
                say("starting the Serve app on a local Ray instance (a minute or so)...")
                url, stop_serve = targets.start_service(cfg, _free_port())
                try:

                    def replicas() -> dict[str, int]:
                        return {f"{name} {pid}": pid for name, pid in every_service_process(me)}

                    say(f"Serve app at {url}: {', '.join(sorted(replicas()))}; {opts.duration_s:g} s of load")
                    run = await soak_one(url, model, replicas, "serve", admin_key, opts, prompts, say)
                finally:
                    stop_serve()
        finally:
            sim.stop()
    report["runs"].append(run)
    report["environment"]["loadavg_at_end"] = list(os.getloadavg())
    return report


def _num(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def soak_markdown(report: dict[str, Any]) -> str:
    """Per run: what the load did, then per process and measure the series and its verdict."""
    out = []
    for run in report["runs"]:
        lines = [
            f"| {run['target']}, concurrency {run['concurrency']}, {run['duration_s']:.0f} s "
            f"({run['ok']} ok, {run['errors']} errors, {run['rps']:.1f} req/s; "
            f"{len(run['samples'])} samples) | first | last | min | max | growth over 2nd half "
            "| noise | verdict | at rest after |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for name, measures in run["series"].items():
            for measure, t in measures.items():
                lines.append(
                    f"| {name}: {MEASURES[measure]} | {_num(t['first'])} | {_num(t['last'])} "
                    f"| {_num(t['min'])} | {_num(t['max'])} | {_num(t['growth'])} | {_num(t['noise'])} "
                    f"| {t['verdict']} | {_num(t.get('at_rest', math.nan))} |"
                )
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def write_soak_report(report: dict[str, Any], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    (out / "soak.md").write_text(soak_markdown(report))


__all__ = ["SoakOptions", "grew", "process_sample", "run_soak", "soak_markdown", "trend", "write_soak_report"]
