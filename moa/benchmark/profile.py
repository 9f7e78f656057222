"""Where the Serve app's processes spend CPU under a benchmark load: py-spy on every replica and
the HTTP proxy while ``moa bench`` runs, the raw stacks kept, their frames bucketed by package.

    python -m moa.benchmark.profile --out DIR [--duration 25] [--rate 200] -- BENCH ARGS...

starts ``moa bench BENCH ARGS`` (the ``moa`` app's replicas must come up, or, for a ``local:``
target, the ``moa serve --local`` process: profile that target alone, or after the baseline) and
waits until the simulator has served the warm-up request, so the window covers the measured load;
then, for ``--duration`` seconds, it runs ``py-spy record --gil --nonblocking --format raw`` at
``--rate`` Hz on each replica and on the proxy (or on the local process), and reads each
process's CPU seconds at both ends. It writes
the raw stacks (``DIR/<process>.txt``), the bench's results (``DIR/bench/``) and
``DIR/profile.json`` (with ``--flamegraph``, also ``DIR/<process>.svg``); ``--summarize`` renders
the table again from the raw files.

What the figures mean: "CPU s" is the process's user + system time over the window. ``--gil``
samples only the thread holding Python's GIL, so "Python s" (samples / rate) is time spent running
Python code or C code called from it (pickle, pydantic-core); the rest of the CPU ("outside
Python") is threads that run without the GIL: Ray's C++ core worker and its gRPC threads. (Without
``--gil``, py-spy cannot tell a thread waiting inside C++ from one working there, and the waits
dominate.) The Python samples are bucketed by their leaf frame's file; the project's share is
inclusive (any frame of ``moa/``, ``actors/``, ``observability/`` or ``serve_app.py`` on the stack, or
of the ``moa_actors/``, ``moa_observability/`` and ``moa_serve_app.py`` an installed wheel holds).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Leaf-frame buckets, first match wins; matched against the frame's file path: a source tree (or an
# editable install) runs the folders, an installed wheel the import names they install under.
BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("project", re.compile(r"/(moa|(moa_)?actors|(moa_)?observability)/|/(moa_)?serve_app\.py")),
    ("Ray Serve", re.compile(r"/ray/serve/")),
    ("Ray core", re.compile(r"/ray/")),
    (
        "LLM SDKs + HTTP clients",
        re.compile(r"/(openai|anthropic|google/genai|httpx|httpcore|aiohttp|h11|anyio)/"),
    ),
    ("web stack (uvicorn, starlette, fastapi)", re.compile(r"/(uvicorn|starlette|fastapi)/")),
    (
        "serialisation (pydantic, pickle, json)",
        re.compile(r"/(pydantic|pydantic_core)/|pickle|/json/|cloudpickle"),
    ),
    ("tracing and metrics (opentelemetry, prometheus)", re.compile(r"/(opentelemetry|prometheus_client)/")),
    (
        "event loop and threads (asyncio, threading)",
        re.compile(r"/(asyncio|concurrent)/|threading\.py|selectors\.py"),
    ),
)
PROJECT = BUCKETS[0][1]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_REPLICA = re.compile(r"ray::ServeReplica:moa:(?P<name>[\w-]+)")
_PROXY = re.compile(r"ray::ProxyActor")
# `moa serve --local`, as the bench's local: target starts it (moa.benchmark.runner.LocalService).
_LOCAL = re.compile(r"moa\.cli serve --local ")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def _file(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return m.group("file") if m else frame


def bucket_of(frame: str) -> str:
    path = _file(frame)
    return next((name for name, pattern in BUCKETS if pattern.search(path)), "other")


def summarize_raw(text: str, rate: float) -> dict[str, Any]:
    """py-spy's raw format (``frame;frame;...;leaf COUNT`` per line) as shares by bucket."""
    self_counts: Counter[str] = Counter()
    project = total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The first frame is the thread's name ("thread (0x...)" or "process ..."), not code.
        code = [f for f in frames if _FRAME.match(f.strip())]
        if not code:
            continue
        total += count
        self_counts[bucket_of(code[-1])] += count
        if any(PROJECT.search(_file(f)) for f in code):
            project += count
    names = [n for n, _ in BUCKETS] + ["other"]
    return {
        "samples": total,
        "python_s": total / rate,
        "self_share": {n: self_counts[n] / total if total else 0.0 for n in names},
        "project_inclusive_share": project / total if total else 0.0,
    }


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(profile: dict[str, Any]) -> str:
    names = [n for n, _ in BUCKETS] + ["other"]
    head = "| process | CPU s | Python s (GIL held) | outside Python | project (inclusive) | " + " | ".join(
        names
    )
    lines = [head + " |", "|---|" + "---:|" * (len(names) + 4)]
    for name, p in profile["processes"].items():
        cpu, py = p.get("cpu_s"), p["python_s"]
        outside = "-" if cpu is None else f"{max(cpu - py, 0.0):.1f}"
        shares = " | ".join(f"{100 * p['self_share'][n]:.0f}%" for n in names)
        lines.append(
            f"| {name} | {_num(cpu)} | {py:.1f} | {outside} "
            f"| {100 * p['project_inclusive_share']:.0f}% | {shares} |"
        )
    return "\n".join(lines) + "\n"


def service_processes(root: int) -> dict[str, int]:
    """The moa app's replicas and the proxy among ``root``'s descendants (not another Ray's):
    one process per deployment (the first found; ``every_service_process`` lists them all)."""
    found: dict[str, int] = {}
    for name, pid in every_service_process(root):
        found.setdefault(name, pid)
    return found


def every_service_process(root: int) -> list[tuple[str, int]]:
    """Each replica of the moa app (by deployment name: an autoscaled one may have several), the
    proxy, or ``moa serve --local``, among ``root``'s descendants, with its pid."""
    import psutil

    found: list[tuple[str, int]] = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            args = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        m = _REPLICA.search(args)
        if _LOCAL.search(args):
            found.append(("local", proc.pid))
        elif m:
            found.append((m.group("name"), proc.pid))
        elif _PROXY.search(args):
            found.append(("proxy", proc.pid))
    return found


def _load_started(root: int, procs: dict[str, int]) -> bool:
    """The app is up and the simulator has served the warm-up request (a proposer layer and an
    aggregator): the measured requests follow at once. For ``moa serve --local`` (a ``local:``
    target), once its ``/healthz`` answers (start-up is not measured) and the simulator has
    served the four calls of its warm-up since (first calls build the SDKs' models)."""
    if "local" in procs:
        if not _answers(procs["local"]):
            return False
        # The calls the simulator had served when the server came up, then its warm-up's four.
        served = _served(root)
        _LOCAL_UP.setdefault(procs["local"], served)
        return served >= _LOCAL_UP[procs["local"]] + 4
    if "ingress" not in procs or "proxy" not in procs or sum(k.startswith("provider") for k in procs) < 3:
        return False
    return _served(root) >= 4


# What the simulator had served when each `moa serve --local` process first answered.
_LOCAL_UP: dict[int, int] = {}


def _served(root: int) -> int:
    """The calls the bench's simulator (a child of ``root``) has served; 0 before it answers."""
    import httpx
    import psutil

    for proc in psutil.Process(root).children(recursive=True):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        if "simulate" in args and "--port" in args:
            port = args[args.index("--port") + 1]
            try:
                stats = httpx.get(f"http://127.0.0.1:{port}/admin/stats", timeout=2).json()
            except httpx.HTTPError:
                return 0
            return int(stats.get("total_requests", 0))
    return 0


def _answers(pid: int) -> bool:
    """``moa serve --local`` (process ``pid``) has started: its ``/healthz`` answers."""
    import httpx
    import psutil

    try:
        args = psutil.Process(pid).cmdline()
        port = args[args.index("--port") + 1]
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except (psutil.Error, ValueError, IndexError, httpx.HTTPError):
        return False


def _cpu(procs: dict[str, int]) -> dict[str, float]:
    import psutil

    used: dict[str, float] = {}
    for name, pid in procs.items():
        try:
            t = psutil.Process(pid).cpu_times()
            used[name] = t.user + t.system
        except psutil.Error:
            continue
    return used


def summarize_dir(out: Path, rate: float | None = None) -> dict[str, Any]:
    """The table's figures from a profile directory's raw stacks (``*.txt``, or ``*.txt.gz``)."""
    meta = json.loads((out / "profile.json").read_text()) if (out / "profile.json").exists() else {}
    rate = rate or meta.get("rate", 200)
    raw = {f.name.split(".")[0]: f for f in sorted([*out.glob("*.txt"), *out.glob("*.txt.gz")])}
    raw.pop("bench", None)
    meta["processes"] = {
        name: {**summarize_raw(_read(f), rate), "cpu_s": meta.get("cpu_s", {}).get(name)}
        for name, f in raw.items()
    }
    return meta


def _read(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moa.benchmark.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--duration", type=int, default=25)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--summarize", action="store_true", help="only render the table from --out's raw files")
    p.add_argument(
        "--flamegraph",
        action="store_true",
        help="also write each process's flame graph (DIR/<process>.svg) from a second py-spy",
    )
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the moa bench arguments")
    args = p.parse_args(argv)
    if args.summarize:
        print(markdown(summarize_dir(args.out)))
        return 0
    bench_args = [a for a in args.bench if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moa.cli", "bench", *bench_args, "--out", str(args.out / "bench")]
    with (args.out / "bench.txt").open("w") as log:
        bench = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        procs: dict[str, int] = {}
        while time.monotonic() < deadline and bench.poll() is None:
            procs = service_processes(bench.pid)
            if _load_started(bench.pid, procs):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the load did not start (replicas found: {sorted(procs)})")
        procs = service_processes(bench.pid)
        cpu0 = _cpu(procs)
        spy_args = [PY_SPY, "record", "--gil", "--nonblocking", "--full-filenames", "--format", "raw"]
        spy_args += ["-r", str(args.rate), "-d", str(args.duration)]
        spies = [
            subprocess.Popen(
                [*spy_args, "-o", str(args.out / f"{name}.txt"), "--pid", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in procs.items()
        ]
        if args.flamegraph:
            # A second sampler per process for the picture: py-spy writes one format a run.
            flame_args = [a if a != "raw" else "flamegraph" for a in spy_args]
            spies += [
                subprocess.Popen(
                    [*flame_args, "-o", str(args.out / f"{name}.svg"), "--pid", str(pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in procs.items()
            ]
        for spy in spies:
            spy.wait()
        cpu = {name: round(used - cpu0.get(name, 0.0), 2) for name, used in _cpu(procs).items()}
        bench.wait()
    finally:
        if bench.poll() is None:
            bench.terminate()
            bench.wait(60)
    meta = {
        "command": "python -m moa.benchmark.profile " + " ".join(sys.argv[1:] if argv is None else argv),
        "py_spy": " ".join(spy_args[1:]),
        "pids": procs,
        # Each process's user + system CPU seconds while it was sampled (py-spy's own cost included).
        "cpu_s": cpu,
        "rate": args.rate,
    }
    (args.out / "profile.json").write_text(json.dumps(meta, indent=2))
    summary = summarize_dir(args.out, args.rate)
    (args.out / "profile.json").write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
