"""Draw the Grafana dashboard (``observability/grafana/moa-serve.json``) from a real Prometheus,
for docs/MONITORING.md's picture: Grafana itself cannot be installed where this project builds,
so each panel's own queries run against Prometheus's HTTP API (``query_range``) and matplotlib
draws them in the dashboard's layout. It is a rendering of the dashboard's queries, not a Grafana
screenshot.

``--demo`` makes the traffic too, all on this machine: the simulator, ``moa serve`` (Ray) with a
fixed metrics port, a Prometheus with the shipped rules scraping it, clients asking with two keys,
then faults (a proposer failing half its calls, a slow aggregator, a burst over the admission
limit), and renders the run. Needs the ``bench`` extra (matplotlib), Ray and ``prometheus``.

    python -m moa.benchmark.dashboard_render --demo --minutes 20 --out docs/monitoring-dashboard.png
    python -m moa.benchmark.dashboard_render --prometheus http://127.0.0.1:9090 --application moa \\
        --since 3600 --out dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "moa-serve.json"
RULES = [HERE / "prometheus" / "rules.yaml", HERE / "prometheus" / "alerts.yaml"]
UNITS = {"reqps": "req/s", "s": "s", "percentunit": "", "currencyUSD": "USD", "short": ""}


def _expr(expr: str, application: str, rate_interval: str) -> str:
    return expr.replace("$application", application).replace("$__rate_interval", rate_interval)


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt) or json.dumps(labels)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": step}
    r = httpx.get(prometheus + "/api/v1/query_range", params=params, timeout=60)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def render(
    prometheus: str, application: str, start: float, end: float, out: Path, rate_interval: str = "1m"
) -> None:
    """One picture of every panel, laid out as the dashboard's gridPos says, over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24, height * 0.42), dpi=72)
    grid = fig.add_gridspec(height, 24, hspace=0.0, wspace=0.0, left=0.03, right=0.99, top=0.97, bottom=0.02)
    fig.suptitle(
        f"{dash['title']}: the dashboard's queries on simulated traffic (application {application}; "
        "rendered from Prometheus with matplotlib, not a Grafana screenshot)",
        fontsize=15,
    )
    step = max((end - start) / 240, 5.0)
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], :])
            ax.axis("off")
            ax.text(0.0, 0.1, p["title"], fontsize=14, fontweight="bold", transform=ax.transAxes)
            continue
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"] - 1, g["x"] + 1 : g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=11, loc="left")
        unit = p["fieldConfig"]["defaults"].get("unit", "short")
        drawn = 0
        for t in p["targets"]:
            for series in query_range(
                prometheus, _expr(t["expr"], application, rate_interval), start, end, step
            ):
                xs = [(float(ts) - start) / 60 for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                dashed = "threshold" in t["legendFormat"] or "limit" in t["legendFormat"]
                ax.plot(
                    xs,
                    ys,
                    "--" if dashed else "-",
                    lw=1.3,
                    label=_legend(t["legendFormat"], series["metric"]),
                )
                drawn += 1
        for step_ in p["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]:
            ax.axhline(step_["value"], color=step_["color"], ls=":", lw=1)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif UNITS.get(unit):
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=UNITS[unit]: f"{v:g} {u}"))
        ax.set_xlim(0, (end - start) / 60)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


# -- the demo: simulated traffic with faults ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(probe: Callable[[], bool], within_s: float, what: str) -> None:
    end = time.monotonic() + within_s
    while not probe():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {within_s:g} s for {what}")
        time.sleep(0.5)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def demo(out: Path, minutes: float) -> None:
    """Run the service on the simulator for ``minutes`` with faults in the middle, then render."""
    import os

    from moa.auth import new_key, new_record
    from moa.config import load_config
    from moa.simulator.profile import ModelProfile, SimProfile
    from moa.simulator.server import SimulatorServer
    from moa.state import KeyLimits
    from moa.state.sqlite_store import SQLiteStore

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("prometheus is not installed (apt-get install prometheus)")
    work = Path(tempfile.mkdtemp(prefix="moa-dashboard-"))
    keys = {"team-a": new_key(), "team-b": new_key()}

    async def make_keys() -> None:
        store = SQLiteStore(work / "state.db")
        await store.create_key(new_record("team-a", keys["team-a"], KeyLimits(budget_usd=2.5)))
        await store.create_key(new_record("team-b", keys["team-b"], KeyLimits(budget_usd=50.0)))
        await store.close()

    asyncio.run(make_keys())
    profile = SimProfile(default=ModelProfile(ttft_s=0.15, tokens_per_s=400.0, jitter=0.3))
    with SimulatorServer(profile) as sim:
        raw = load_config(None).model_dump(mode="json")
        raw["simulator"] = {"mode": "on", "url": sim.url}
        raw["providers"]["gemini"]["retry"] = {"max_attempts": 1}
        raw["state"] = {"dir": str(work)}
        # Six requests in progress per replica, any key may take all six: the burst is shed as
        # "overloaded", for capacity (not for one key's share).
        raw["server"]["max_concurrent_requests"] = 6
        raw["server"]["key_concurrency_share"] = 1.0
        raw["cache"] = {"enabled": True, "store": "memory"}
        shadow = {"enabled": True, "sample_rate": 0.5, "presets": ["single"]}
        raw["eval"] = {"shadow": shadow | {"baseline": "openai/gpt-4o-mini", "judge": "openai/gpt-4.1-mini"}}
        (work / "config.yaml").write_text(yaml.safe_dump(raw))
        port, metrics = _free_port(), _free_port()
        moa = str(Path(sys.executable).parent / "moa")
        env = {**os.environ, "MOA_STATE_DIR": str(work)}
        serve = [moa, "serve", "--config", str(work / "config.yaml"), "--port", str(port)]
        with _process([*serve, "--metrics-port", str(metrics)], work / "serve.log", env):
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _up(url + "/healthz"), 300, "moa serve")
            prom_port = _free_port()
            config = {
                "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
                "rule_files": [str(p) for p in RULES],
                "scrape_configs": [
                    {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}
                ],
            }
            (work / "prometheus.yml").write_text(yaml.safe_dump(config))
            prom_args = [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ]
            with _process(prom_args, work / "prometheus.log"):
                prom = f"http://127.0.0.1:{prom_port}"
                _wait(lambda: _up(prom + "/-/ready"), 60, "Prometheus")
                start = time.time()
                _traffic(url, sim.url, keys, minutes * 60)
                time.sleep(15)  # Ray's export period, then a scrape: the last requests are in
                render(prom, "moa", start, time.time(), out)
    print(f"wrote {out} (work files in {work})")


def _traffic(url: str, sim: str, keys: dict[str, str], seconds: float) -> None:
    """Clients asking for ``seconds``, with the faults of docs/MONITORING.md's picture on a
    schedule proportional to it (out of 20: gemini-2.5-flash fails half its calls in minutes 6-11,
    gpt-4.1 answers 2 s late in 12-16, bursts over the admission limit at 17, 17.5 and 18)."""
    stop = time.monotonic() + seconds
    rng = random.Random(7)
    repeated = [f"Explain {topic} in two sentences." for topic in ("DNS", "TLS", "RAID", "CRDTs", "Paxos")]

    def ask(key: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )

    def client(n: int) -> None:
        while time.monotonic() < stop:
            key = keys["team-a"] if rng.random() < 0.3 else keys["team-b"]
            roll = rng.random()
            if roll < 0.3:  # repeated questions: the final cache
                body = {
                    "model": "single",
                    "temperature": 0,
                    "messages": [{"role": "user", "content": rng.choice(repeated)}],
                }
            else:
                model = "moa-lite" if roll < 0.75 else ("moa" if roll < 0.85 else "single")
                question = f"Question {n}-{rng.random():.6f}: how do vaccines train the immune system?"
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": question}],
                    "stream": roll > 0.9,
                }
            # A client's own bound on answers: a key's budget holds each request's worst case.
            ask(key, {**body, "max_tokens": 512})

    def fault(model: str, spec: dict[str, Any] | None) -> None:
        if spec is None:
            httpx.delete(f"{sim}/admin/faults").raise_for_status()
        else:
            httpx.put(f"{sim}/admin/faults/{model}", json=spec).raise_for_status()

    t0 = time.monotonic()
    schedule: list[tuple[float, Callable[[], None]]] = [
        (6, lambda: fault("gemini-2.5-flash", {"error_500": {"rate": 0.5}})),
        (11, lambda: fault("*", None)),
        (12, lambda: fault("gpt-4.1", {"hang": {"hang_s": 2.0}})),
        (16, lambda: fault("*", None)),
        # Three bursts: Prometheus counts no increase at a counter's first sample, so a lone
        # burst would not show in rate().
        (17, lambda: _burst(ask, keys)),
        (17.5, lambda: _burst(ask, keys)),
        (18, lambda: _burst(ask, keys)),
    ]
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    for at, action in schedule:
        while time.monotonic() - t0 < at / 20 * seconds:
            time.sleep(0.5)
        action()
    for t in threads:
        t.join(120)


def _burst(ask: Callable[[str, dict[str, Any]], None], keys: dict[str, str]) -> None:
    """Twenty requests at once from both keys, over the six the ingress admits: some are shed."""
    body = {"model": "moa-lite", "max_tokens": 512, "messages": [{"role": "user", "content": "A burst."}]}
    both = sorted(keys.values())
    threads = [threading.Thread(target=ask, args=(both[i % 2], body), daemon=True) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m moa.benchmark.dashboard_render", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("dashboard.png"), help="the PNG to write")
    p.add_argument(
        "--demo", action="store_true", help="run moa serve on the simulator with faults, then render"
    )
    p.add_argument("--minutes", type=float, default=20.0, help="--demo: how long the traffic runs")
    p.add_argument(
        "--prometheus", default="http://127.0.0.1:9090", help="without --demo: the Prometheus to query"
    )
    p.add_argument("--application", default="moa", help="without --demo: the Serve application")
    p.add_argument("--since", type=float, default=3600.0, help="without --demo: seconds back from now")
    args = p.parse_args(argv)
    if args.demo:
        demo(args.out, args.minutes)
    else:
        now = time.time()
        render(args.prometheus, args.application, now - args.since, now, args.out)


if __name__ == "__main__":
    main()
