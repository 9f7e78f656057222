"""``moa bench``: the Serve app, a single-process baseline and a single-model call, side by side
against one simulator, at several concurrency levels and under provider faults."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.progress import Progress

from moa.benchmark.baseline import AGGREGATOR_PROMPT, RETRY, Baseline
from moa.benchmark.compare import (
    PresetBaseline,
    compare_tables,
    compared_preset,
    service_calls,
)
from moa.benchmark.options import FAULTY_MODEL, SCENARIOS, BenchOptions
from moa.benchmark.stats import BREAKDOWN_PARTS, Sample, breakdown, summarize, trim_detail
from moa.config import ConfigError, MoAConfig, load_config
from moa.errors import FallbackReason

Send = Callable[[str], Awaitable[Sample]]


def load_prompts(path: Path | None) -> list[str]:
    """The bundled prompts, or a JSONL file: ``{"prompt"}`` lines or MT-Bench's ``{"turns"}``.

    A file that cannot be read or parsed is a ``ConfigError``: one line naming it (``moa``
    exits 2), before anything starts, rather than a traceback."""
    try:
        text = (
            path.read_text()
            if path
            else resources.files("moa").joinpath("data/bench_prompts.jsonl").read_text()
        )
    except OSError as e:
        raise ConfigError(f"cannot read the prompts file {path}: {e.strerror}") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if "prompt" in row else row["turns"][0])
            except (ValueError, KeyError, IndexError, TypeError):
                raise ConfigError(
                    f'{path}:{n}: not a {{"prompt"}} or MT-Bench {{"turns"}} JSON line'
                ) from None
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessTree:
    """CPU seconds and memory of this process and its descendants, the simulator excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.me = psutil.Process()

    def _procs(self) -> list[psutil.Process]:
        procs = [self.me]
        for p in self.me.children(recursive=True):
            try:
                if p.pid not in self.exclude and not any(a.pid in self.exclude for a in p.parents()):
                    procs.append(p)
            except psutil.Error:
                continue
        return procs

    def cpu_s(self) -> float:
        total = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def rss_mb(self) -> float:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20


async def warm_up(send: Send, prompts: Sequence[str]) -> None:
    """One uncounted request per target first: connection pools, SDK clients and replicas' first
    calls are set up once per run, and would otherwise be the p99 of every concurrency-1 level."""
    await send(prompts[0])


def level_line(label: str, row: dict[str, Any]) -> str:
    """One finished level, as a line in the run's output: readable in a log as on a terminal."""
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(row["error_kinds"].items())) or "none"
    return (
        f"{label}: {row['ok']}/{row['requests']} ok, {row['rps']:.1f} req/s, "
        f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, errors: {errors}"
    )


async def run_level(
    send: Send,
    prompts: Sequence[str],
    concurrency: int,
    n: int,
    tree: ProcessTree,
    progress: Progress,
    task: Any,
    label: str | None = None,
) -> dict[str, Any]:
    samples: list[Sample] = []
    counter = iter(range(n))
    peak = tree.rss_mb()

    async def worker() -> None:
        for i in counter:
            samples.append(await send(prompts[i % len(prompts)]))
            progress.advance(task)

    async def watch_memory() -> None:
        nonlocal peak
        while True:
            await asyncio.sleep(0.25)
            peak = max(peak, tree.rss_mb())

    cpu0, t0 = tree.cpu_s(), time.perf_counter()
    watcher = asyncio.create_task(watch_memory())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    watcher.cancel()
    row = summarize(samples, wall, tree.cpu_s() - cpu0, peak)
    if label is not None:
        progress.console.print(level_line(label, row))
    return row


class HttpTarget:
    """The Serve app over HTTP; the detail extension gives the simulated critical path."""

    def __init__(
        self,
        url: str,
        model: str,
        keep: list[dict[str, Any]] | None = None,
        api_key: str | None = None,
        stream: bool = False,
        aggregation: str | None = None,
    ) -> None:
        self.url, self.model = url, model
        self.stream, self.aggregation = stream, aggregation
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            timeout=120, limits=httpx.Limits(max_connections=512), headers=headers
        )
        # With --details: each answered request's timings, for the overhead breakdown.
        self.keep = keep
        # With --compare: each answered request's prompt, end-to-end time and calls (compare.py).
        self.calls: list[dict[str, Any]] | None = None

    async def send(self, prompt: str) -> Sample:
        moa: dict[str, Any] = {"detail": True}
        if self.aggregation:
            moa["aggregation"] = self.aggregation
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "moa": moa}
        if self.stream:
            return await self._send_streaming(body, prompt)
        t0 = time.perf_counter()
        try:
            r = await self.client.post(self.url + "/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=type(exc).__name__)
        e2e = time.perf_counter() - t0
        if r.status_code != 200:
            return Sample(e2e_s=e2e, ok=False, error=str(r.status_code), met_quorum=False)
        return self._sample(e2e, r.json()["moa"], prompt)

    async def _send_streaming(self, body: dict[str, Any], prompt: str) -> Sample:
        """The same request streamed: first byte and first answer text timed as they arrive."""
        t0 = time.perf_counter()
        first_byte = ttft = None
        detail: dict[str, Any] | None = None
        error: str | None = None
        try:
            async with self.client.stream(
                "POST", self.url + "/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=str(r.status_code))
                async for line in r.aiter_lines():
                    first_byte = first_byte if first_byte is not None else time.perf_counter() - t0
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        error = str(event["error"].get("code"))
                    elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                    elif "moa" in event and "calls" in event["moa"]:
                        detail = event["moa"]
        except httpx.HTTPError as exc:
            return Sample(e2e_s=time.perf_counter() - t0, ok=False, error=type(exc).__name__)
        e2e = time.perf_counter() - t0
        if error is not None or detail is None:
            return Sample(e2e_s=e2e, ok=False, error=error or "no detail", first_byte_s=first_byte)
        sample = self._sample(e2e, detail, prompt)
        sample.first_byte_s, sample.ttft_s = first_byte, ttft
        return sample

    def _sample(self, e2e: float, detail: dict[str, Any], prompt: str) -> Sample:
        if self.keep is not None:
            self.keep.append(trim_detail(e2e, detail))
        if self.calls is not None:
            self.calls.append({"prompt": prompt, "e2e_s": e2e, "calls": service_calls(detail)})
        return Sample(
            e2e_s=e2e,
            ok=True,
            simulated_s=detail["totals"]["provider_critical_path_s"],
            # An aggregator that failed (a fallback answered) is no missed quorum.
            met_quorum=detail["fallback_reason"] != FallbackReason.QUORUM_MISSED.value,
            cut_straggler=detail["totals"]["stragglers_cancelled"] > 0,
            tokens=sum(c["usage"]["input_tokens"] + c["usage"]["output_tokens"] for c in detail["calls"]),
            cost_usd=detail["totals"]["cost_usd"],
            input_tokens=sum(c["usage"]["input_tokens"] for c in detail["calls"]),
            cached_tokens=sum(c["usage"]["cached_tokens"] for c in detail["calls"]),
            cache_saved_usd=sum(_cache_saving(c) for c in detail["calls"]),
        )


@functools.cache
def _bundled() -> MoAConfig:
    return load_config(None)


def _cache_saving(call: dict[str, Any]) -> float:
    """What a call's prompt-cache reads saved against its model's full input price (the bundled
    prices, which the bench's config keeps)."""
    price = _bundled().price(call["provider"], call["model"])
    cached_price = price.cached_input_per_mtok
    if cached_price is None:
        return 0.0
    return call["usage"]["cached_tokens"] * (price.input_per_mtok - cached_price) / 1_000_000


def bench_config(
    sim_url: str, layer_deadline_s: float, staircase_chunk_chars: int | None = None
) -> MoAConfig:
    """The bundled config against the bench's simulator, with the bench's layer deadline (and
    staircase chunk size, when given)."""
    raw = load_config(None).model_dump(mode="json")
    raw["simulator"] = {"mode": "on", "url": sim_url}
    for preset in raw["presets"].values():
        if preset.get("layers"):
            preset["layer_deadline_s"] = layer_deadline_s
            if staircase_chunk_chars is not None:
                preset["staircase_chunk_chars"] = staircase_chunk_chars
    # Enough room for the highest concurrency level.
    raw["server"] = {**raw.get("server", {}), "max_concurrent_requests": 1024}
    for p in raw["providers"].values():
        p["deployment"] = {**p.get("deployment", {}), "num_replicas": 1}
        p["deployment"].pop("autoscaling", None)
        # The bundled RPM/TPM budgets stay: their limiter is part of what a request costs.
        p["limits"] = {**p.get("limits", {}), "concurrency": 256}
    from moa.config import parse_config

    return parse_config(raw, "the benchmark config")


class Simulator:
    """The simulator in its own process, so its CPU is not counted as the orchestration's."""

    def __init__(self, ttft_s: float, tps: float, jitter: float, wait: bool = True) -> None:
        """Started, and answering unless ``wait`` is False: then its URL is known at once, and
        ``ready`` waits for it (another process can start meanwhile)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--port", str(self.port), "--ttft", str(ttft_s), "--tps", str(tps), "--jitter", str(jitter)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "simulate", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.ready()

    def ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/admin/stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the simulator did not start")

    def faults(self, faults: dict[str, Any]) -> None:
        httpx.delete(self.url + "/admin/faults").raise_for_status()
        if faults:
            httpx.put(f"{self.url}/admin/faults/{FAULTY_MODEL}", json=faults).raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class LocalService:
    """``moa serve --local`` in a process of its own on the bench's config (written to a YAML file
    it reads as any user's), so the in-process path is measured as it is deployed: over HTTP, its
    CPU in its own process (a descendant of the bench's, so counted in the process tree), beside
    the baseline in the same run. It inherits the bench's state directory (``own_state``)."""

    def __init__(self, cfg: MoAConfig, port: int | None = None, timeout_s: float = 60.0) -> None:
        import yaml

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="moa-bench-local-")
        config = Path(self._dir.name) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        self.log = Path(self._dir.name) / "serve.log"
        serve = ["serve", "--local", "--config", str(config), "--port", str(self.port)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moa.cli", *serve],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = self.log.read_text()[-2000:]
                self._dir.cleanup()
                raise RuntimeError(f"moa serve --local exited ({self.proc.returncode}): {why}")
            try:
                httpx.get(self.url + "/healthz", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moa serve --local did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM: the server drains (nothing is in flight by then) and exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._dir.cleanup()


# The benchmark's Ray side (the service on a local Ray instance, the bare floor app) registers
# itself under this entry point group (``pyproject.toml``): the core never imports Ray by name.
RAY_TARGETS_GROUP = "moa.bench"
# The baseline's per-call deadline outside the fault scenarios: the presets' call_timeout_s.
BASELINE_TIMEOUT_S = 60.0


def ray_targets(name: str = "ray") -> Any:
    """A module of the benchmark's Ray side, found by entry point: ``ray`` is the Serve app and
    floor of the main run (``moa_actors.bench_targets``), ``ray_cache`` the cache run's
    (``moa_actors.cache_bench``)."""
    from importlib.metadata import entry_points

    found = entry_points(group=RAY_TARGETS_GROUP, name=name)
    if not found:
        raise RuntimeError(
            f"no {RAY_TARGETS_GROUP!r} entry point named {name!r}: reinstall the project "
            "(pip install -e '.[serve,bench]')"
        )
    return next(iter(found)).load()


@contextlib.contextmanager
def own_state(api_key: str | None) -> Iterator[None]:
    """The bench's Serve app on a fresh, empty state directory (no API keys, no ledger), unless an
    API key was given: then on the configured state, where that key lives. Set in this process's
    environment (``MOA_STATE_DIR`` wins over the config) before Ray starts, so the replicas
    inherit it; restored afterwards."""
    if api_key is not None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("MOA_STATE_DIR", "MOA_REDIS_URL")}
    with tempfile.TemporaryDirectory(prefix="moa-bench-state-") as tmp:
        os.environ["MOA_STATE_DIR"] = tmp
        os.environ.pop("MOA_REDIS_URL", None)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def failures(report: dict[str, Any]) -> list[str]:
    """One line per target and level whose requests failed outside the fault scenarios (where
    failures are staged), with what a 401 or 403 means: ``moa bench`` exits non-zero on any, so
    a table of errors is never reported as a successful run."""
    from moa.client_auth import auth_advice

    lines, advice = [], {}
    for row in report.get("levels", []):
        if row.get("errors"):
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(row.get("error_kinds", {}).items()))
            lines.append(f"{row['target']} c={row['concurrency']}: {row['errors']} failed ({kinds})")
            for kind in row.get("error_kinds", {}):
                why = auth_advice(kind)
                if why is not None:
                    advice[kind] = why
    return lines + list(advice.values())


def needs_ray(opts: BenchOptions) -> bool:
    """Whether a run starts the Ray app: for a ``serve:`` target, the floor or a fault scenario
    (the scenarios run on ``serve:moa-lite``). A run of ``baseline`` and ``local:`` targets alone,
    with ``--scenarios ''``, never imports Ray."""
    return bool(opts.scenarios) or any(t == "floor" or t.startswith("serve:") for t in opts.targets)


async def run(opts: BenchOptions) -> dict[str, Any]:
    with own_state(opts.api_key):
        return await _run(opts)


async def _run(opts: BenchOptions) -> dict[str, Any]:
    prompts = load_prompts(opts.prompts)
    # --compare: the baseline makes the calls this preset makes (checked before anything starts).
    preset = compared_preset(opts.targets) if opts.compare else None
    if preset is not None and any(mode != "final" for mode in opts.aggregation):
        raise ConfigError("--compare mirrors the final aggregation: no --aggregation early or staircase")
    # Imported only (Ray starts with the Serve app, after the baseline and the local targets), and
    # before the simulator starts: a missing Ray side leaves no simulator process behind.
    targets = ray_targets() if needs_ray(opts) else None
    sim = Simulator(opts.ttft_s, opts.tokens_per_s, opts.jitter)
    tree = ProcessTree(exclude={sim.proc.pid})
    serve_targets = [t.split(":", 1)[1] for t in opts.targets if t.startswith("serve:")]
    modes: list[str | None] = list(opts.aggregation) or [None]
    serve_runs = [(model, mode) for model in serve_targets for mode in modes]
    local_runs = [
        (t.split(":", 1)[1], mode) for t in opts.targets if t.startswith("local:") for mode in modes
    ]
    per_level = {c: max(opts.requests, 2 * c) for c in opts.concurrency}
    runs = len(serve_runs) + len(local_runs) + ("baseline" in opts.targets)
    levels = sum(per_level.values()) * runs
    faulted = len(opts.scenarios) * opts.fault_requests * (2 if "baseline" in opts.targets else 1)
    floor = targets.FLOOR_TOTAL if targets is not None and "floor" in opts.targets else 0
    report: dict[str, Any] = {
        "options": _jsonable(opts),
        "baseline": baseline_metadata(opts),
        "environment": environment(),
        "levels": [],
        "scenarios": [],
        "floor": [],
        "details": [],
    }
    if preset is not None:
        report["compare"] = {"preset": preset, "baseline": [], "services": []}
    stop_serve: Callable[[], None] | None = None
    try:
        with Progress() as progress:
            task = progress.add_task("benchmark", total=levels + faulted + floor)
            say = progress.console.print
            say(f"simulator at {sim.url}; {len(prompts)} prompts; {levels + faulted + floor} requests in all")
            cfg = bench_config(sim.url, opts.layer_deadline_s, opts.staircase_chunk_chars)
            if "baseline" in opts.targets:
                base = Baseline(sim.url, timeout_s=BASELINE_TIMEOUT_S)
                mirror = PresetBaseline(base, cfg, preset, None) if preset is not None else None
                ask = mirror.ask if mirror is not None else base.ask
                progress.update(task, description="baseline warm-up")
                await warm_up(ask, prompts)
                for c in opts.concurrency:
                    progress.update(task, description=f"baseline c={c}")
                    label = f"baseline c={c}"
                    if mirror is not None:
                        mirror.keep = []
                        report["compare"]["baseline"].append({"concurrency": c, "requests": mirror.keep})
                    row = await run_level(ask, prompts, c, per_level[c], tree, progress, task, label)
                    report["levels"].append({"target": "baseline", "concurrency": c, **row})
                await base.aclose()
            if local_runs:
                progress.update(task, description="starting moa serve --local")
                local = LocalService(cfg)
                say(f"moa serve --local ready at {local.url} (pid {local.pid})")
                try:
                    for model, mode in local_runs:
                        name = f"local {model}" + (f" ({mode})" if mode else "")
                        await _measure_http(
                            HttpTarget(
                                local.url, model, stream=opts.stream, aggregation=mode, api_key=opts.api_key
                            ),
                            name,
                            opts,
                            prompts,
                            per_level,
                            tree,
                            progress,
                            task,
                            report,
                        )
                finally:
                    local.stop()
            if targets is None:
                return _finish(report, opts)
            say("starting the Serve app on a local Ray instance (a minute or so)...")
            progress.update(task, description="starting Ray and the Serve app")
            url, stop_serve = targets.start_service(cfg, _free_port())
            say(f"Serve app ready at {url}")
            if floor:
                progress.update(task, description="Serve floor (bare app)")
                report["floor"] = await targets.measure_floor(url, progress, task)
                for row in report["floor"]:
                    say(f"floor {row['path']}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
            for model, mode in serve_runs:
                target = HttpTarget(url, model, stream=opts.stream, aggregation=mode, api_key=opts.api_key)
                name = f"serve {model}" + (f" ({mode})" if mode else "")
                await _measure_http(target, name, opts, prompts, per_level, tree, progress, task, report)
            for name in opts.scenarios:
                sim.faults(SCENARIOS[name])
                label = f"fault {name}: serve moa-lite"
                progress.update(task, description=label)
                target = HttpTarget(url, "moa-lite", api_key=opts.api_key)
                c, n = opts.fault_concurrency, opts.fault_requests
                row = await run_level(target.send, prompts, c, n, tree, progress, task, label)
                report["scenarios"].append({"scenario": name, "target": "serve moa-lite", **row})
                if "baseline" in opts.targets:
                    sim.faults(SCENARIOS[name])  # a fresh first_n count for the baseline too
                    label = f"fault {name}: baseline"
                    progress.update(task, description=label)
                    base = Baseline(sim.url, timeout_s=opts.baseline_fault_timeout_s)
                    row = await run_level(base.ask, prompts, c, n, tree, progress, task, label)
                    await base.aclose()
                    report["scenarios"].append({"scenario": name, "target": "baseline", **row})
            sim.faults({})
    finally:
        if stop_serve is not None:
            stop_serve()
        sim.stop()
    return _finish(report, opts)


def _finish(report: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    # Read at the end: starting the Serve app sets its mode's variables (moa_actors.app.THROUGHPUT_ENV).
    report["environment"]["env"] = _serve_env()
    report["environment"]["loadavg_at_end"] = list(os.getloadavg())
    write_report(report, opts.out)
    return report


async def _measure_http(
    target: HttpTarget,
    name: str,
    opts: BenchOptions,
    prompts: Sequence[str],
    per_level: dict[int, int],
    tree: ProcessTree,
    progress: Progress,
    task: Any,
    report: dict[str, Any],
) -> None:
    """An HTTP target (the Ray app or ``moa serve --local``) at every level, after its warm-up."""
    progress.update(task, description=f"{name} warm-up")
    await warm_up(target.send, prompts)
    for c in opts.concurrency:
        label = f"{name} c={c}"
        progress.update(task, description=label)
        kept: list[dict[str, Any]] = []
        target.keep = kept if opts.details else None
        if "compare" in report:
            target.calls = []
            entry = {"target": name, "concurrency": c, "requests": target.calls}
            report["compare"]["services"].append(entry)
        row = await run_level(target.send, prompts, c, per_level[c], tree, progress, task, label)
        report["levels"].append({"target": name, "concurrency": c, **row})
        if opts.details:
            report["details"].append({"target": name, "concurrency": c, "requests": kept})
    target.keep = target.calls = None
    await target.client.aclose()


def environment() -> dict[str, Any]:
    """The machine and mode a run had: the figures mean little without them (other work included)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "packages": {n: installed(n) for n in ("ray", "openai", "anthropic", "google-genai", "httpx")},
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "env": _serve_env(),
    }


def _serve_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}


def baseline_metadata(opts: BenchOptions) -> dict[str, Any]:
    """What the baseline did, so a report says which comparison it made."""
    if opts.compare:
        return {
            "calls": f"those of the preset {compared_preset(opts.targets)} as the engine builds them "
            "(moa.benchmark.compare.PresetBaseline): every proposer waited for, the first aggregator",
            "retry": RETRY.describe(),
            "call_timeout_s": {"levels": BASELINE_TIMEOUT_S},
        }
    return {
        "aggregator_prompt": AGGREGATOR_PROMPT,
        "retry": RETRY.describe(),
        "call_timeout_s": {"levels": BASELINE_TIMEOUT_S, "fault_scenarios": opts.baseline_fault_timeout_s},
    }


def _jsonable(opts: BenchOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items() if k != "results"}


def _fmt(v: float | None, digits: int = 0) -> str:
    """A figure for the tables; "-" for NaN and for a figure an older report does not have."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| target | concurrency | req/s | p50 ms | p95 ms | p99 ms | simulated p50 ms "
        "| e2e/simulated p50 | overhead p50 ms | overhead p99 ms | CPU ms/req | peak RSS MB | met quorum "
        "| cut stragglers | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {_fmt(r['rps'], 1)} | {_fmt(r['p50_ms'])} "
            f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r.get('simulated_p50_ms'))} "
            f"| {_fmt(r.get('e2e_per_simulated_p50'), 3)} | {_fmt(r['overhead_p50_ms'], 1)} "
            f"| {_fmt(r['overhead_p99_ms'], 1)} "
            f"| {_fmt(r['cpu_ms_per_request'], 1)} | {_fmt(r['peak_rss_mb'])} "
            f"| {_pct(r['quorum_met_share'])} | {r.get('cut_stragglers', '-')} | {r['errors']} |"
        )
    streamed = [r for r in report["levels"] if not math.isnan(r.get("ttft_p50_ms", math.nan))]
    if streamed:
        lines += [
            "",
            "| streaming target | concurrency | TTFT p50 ms | TTFT p99 ms | first byte p50 ms "
            "| first byte p99 ms | e2e p50 ms | e2e p99 ms | tokens/req | cost/req USD | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in streamed:
            lines.append(
                f"| {r['target']} | {r['concurrency']} | {_fmt(r['ttft_p50_ms'])} | {_fmt(r['ttft_p99_ms'])} "
                f"| {_fmt(r['first_byte_p50_ms'])} | {_fmt(r['first_byte_p99_ms'])} | {_fmt(r['p50_ms'])} "
                f"| {_fmt(r['p99_ms'])} | {_fmt(r['tokens_per_request'])} "
                f"| {_fmt(r['cost_usd_per_request'], 4)} | {r['errors']} |"
            )
    cached = [r for r in report["levels"] if not math.isnan(r.get("cached_tokens_per_request", math.nan))]
    if cached:
        lines += [
            "",
            "| prompt caching | concurrency | input tokens/req | cached tokens/req | cached share "
            "| saved by caching/req USD | cost/req USD |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cached:
            inputs = r["input_tokens_per_request"]
            share = r["cached_tokens_per_request"] / inputs if inputs else math.nan
            lines.append(
                f"| {r['target']} | {r['concurrency']} | {_fmt(r['input_tokens_per_request'])} "
                f"| {_fmt(r['cached_tokens_per_request'])} | {_pct(share)} "
                f"| {_fmt(r['cache_saved_usd_per_request'], 4)} | {_fmt(r['cost_usd_per_request'], 4)} |"
            )
    if report["scenarios"]:
        lines += [
            "",
            "| fault scenario | target | p50 ms | p99 ms | simulated p50 ms | e2e/simulated p50 | answered "
            "| met quorum | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["scenarios"]:
            lines.append(
                f"| {r['scenario']} | {r['target']} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} "
                f"| {_fmt(r.get('simulated_p50_ms'))} | {_fmt(r.get('e2e_per_simulated_p50'), 3)} "
                f"| {r['ok']}/{r['requests']} | {_pct(r['quorum_met_share'])} | {r['errors']} |"
            )
    if report.get("floor"):
        lines += [
            "",
            "| Serve floor (bare app, concurrency 1) | p50 ms | p99 ms |",
            "|---|---:|---:|",
        ]
        for r in report["floor"]:
            lines.append(f"| `{r['path']}`: {r['what']} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} |")
    if "compare" in report:
        lines += compare_tables(report["compare"], report["levels"])
    for d in report.get("details", []):
        b = breakdown(d["requests"])
        lines += [
            "",
            f"| where the overhead goes: {d['target']}, concurrency {d['concurrency']} "
            f"(p50 over {b['split']} of {b['requests']} requests) | ms |",
            "|---|---:|",
        ]
        lines += [f"| {what} | {_fmt(b['parts_p50_ms'][k], 1)} |" for k, what in BREAKDOWN_PARTS.items()]
        lines.append(f"| sum of the parts' medians | {_fmt(sum(b['parts_p50_ms'].values()), 1)} |")
        lines.append(
            f"| overhead (end-to-end minus simulated critical path) | {_fmt(b['overhead_p50_ms'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, over) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r["target"] for r in report["levels"]):
        rows = [r for r in report["levels"] if r["target"] == target]
        xs = [r["concurrency"] for r in rows]
        line = lat.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{target} p50")[0]
        lat.plot(
            xs,
            [r["p99_ms"] for r in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{target} p99",
        )
        over.plot(xs, [r["overhead_p50_ms"] for r in rows], marker="o", color=line.get_color(), label=target)
    over.set_yscale("log")  # overheads span milliseconds to seconds across targets
    for ax, title, unit in ((lat, "end-to-end latency", "ms"), (over, "orchestration overhead (p50)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    lat.legend(fontsize=7)
    over.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(markdown(report))
    if report["levels"]:
        plot(report, out / "bench.png")


__all__ = ["load_prompts", "markdown", "run", "write_report"]
