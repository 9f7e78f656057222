"""Chaos runs on a real multi-node Ray cluster: ``python -m moa_actors.chaos --out DIR``.

A three-node cluster on this machine (``ray.cluster_utils.Cluster``: a head for the ingress and
the health board, two workers for the provider replicas, one of each provider per worker), the
app deployed against an in-process provider simulator, then one scenario per target. In each, a
steady bounded load runs over loopback HTTP (``moa-lite`` requests, and direct requests to a
provider with a cluster-wide RPM budget, sent faster than the budget allows); after a few seconds
the target is killed: one provider replica, the ingress replica, the health board's replica, the
rate-limiter actor, or a whole worker node (``Cluster.remove_node``; a replacement node joins at
once, as an autoscaler would add one).

For each scenario it reports how many requests were answered, how many failed cleanly (an
OpenAI-style JSON error, by status), how many failed uncleanly (an error body that is not ours),
how many were lost (the connection dropped without a response) or hung (no answer by the request
deadline plus a margin): the last two must be 0; how long after the kill until every request
succeeded again; and whether the RPM budget held: the calls the simulator received for the
metered model never exceed what a full bucket plus its refill allows over the scenario.

Results: ``chaos.json`` and ``chaos.md`` in ``--out``; ``docs/RELIABILITY.md`` holds a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from moa.config import MoAConfig, load_config, parse_config
from moa.simulator.profile import ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer
from moa_actors.health_board import HEALTH_BOARD_NAME

SCENARIOS = ("provider", "ingress", "health-board", "rate-limiter", "node")
METERED_MODEL = "metered-model"
# The budget the metered provider holds for the whole cluster.
METERED_RPM = 30
# Clients each asking again a quarter of a second after an answer or refusal: many times the
# budget in all, so that without the limiter the provider would see far more than a scenario
# allows, and the check that it did not can fail. A limiter that forgot what it had granted shows
# as calls over the bound. (--metered-clients: more of them ask as much in a shorter scenario.)
METERED_CLIENTS = 3
METERED_PAUSE_S = 0.25
DEADLINE_S = 30.0
# A request with no answer this long after its deadline is hung.
HUNG_MARGIN_S = 15.0
QUESTION = [{"role": "user", "content": "Name three uses of a paperclip."}]
PROFILE = SimProfile(default=ModelProfile(ttft_s=0.05, tokens_per_s=400.0, jitter=0.1))


@dataclass
class Outcome:
    kind: str  # "moa" or "metered"
    sent: float  # seconds since the scenario began
    took: float
    status: int | None  # None: lost or hung
    fate: str  # answered | clean | unclean | lost | hung
    code: str | None = None


@dataclass
class ScenarioResult:
    scenario: str
    killed: str
    seconds: float
    killed_at_s: float
    requests: int
    answered: int
    clean_failures: dict[str, int] = field(default_factory=dict)  # "503 no_healthy_provider": n
    unclean: int = 0
    unclean_bodies: list[str] = field(default_factory=list)  # a few, as "status 'body...'"
    lost: int = 0
    hung: int = 0
    recovered_after_s: float = 0.0
    answered_after_recovery: int = 0  # requests sent after the last failure ended, answered
    healthz_ok_after_s: float | None = None
    metered_asked: int = 0  # requests the load sent for the metered model
    metered_sent_to_provider: int = 0
    metered_allowed: int = 0  # a full bucket plus its refill over the scenario
    # What the provider may see: the allowance, plus one more minute's budget when the limiter
    # itself was killed (Serve recreates it with a full bucket: docs/RELIABILITY.md's stated bound).
    metered_bound: int = 0
    budget_held: bool = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chaos_config(sim_url: str) -> MoAConfig:
    """The bundled config, providers spread one replica per worker, a metered provider added."""
    raw = load_config(None).model_dump(mode="json")
    on_workers: dict[str, Any] = {
        "num_cpus": 0.05,
        "num_replicas": 2,
        "max_replicas_per_node": 1,
        "resources": {"provider_node": 0.01},
    }
    for p in raw["providers"].values():
        p["deployment"] = dict(on_workers)
    raw["providers"]["metered"] = {
        "kind": "openai",
        "api_key_env": "CHAOS_METERED_API_KEY",
        "limits": {"rpm": METERED_RPM},
        "deployment": dict(on_workers),
        "models": {METERED_MODEL: {}},
    }
    raw["simulator"] = {"mode": "on", "url": sim_url}
    on_head = {"num_cpus": 0.05, "num_replicas": 1, "resources": {"head_node": 0.01}}
    raw["serve"] = {"ingress": dict(on_head), "health_board": dict(on_head), "aggregator": dict(on_head)}
    raw["server"] = {"request_deadline_s": DEADLINE_S, "max_concurrent_requests": 256}
    return parse_config(raw, "the chaos config")


def _named_actor(fragment: str, prefix: str) -> Any:
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith(prefix) and fragment in name:
            return ray.get_actor(name, namespace=entry["namespace"])
    raise LookupError(f"no live actor named {prefix}...{fragment}...")


class Chaos:
    """The cluster, the app and the load; ``run(scenario)`` kills one target under load."""

    def __init__(
        self, seconds: float, kill_at_s: float, concurrency: int, metered_clients: int = METERED_CLIENTS
    ) -> None:
        self.seconds, self.kill_at_s, self.concurrency = seconds, kill_at_s, concurrency
        self.metered_clients = metered_clients
        self.sim = SimulatorServer(PROFILE).start()
        self.cluster: Any = None
        self.workers: list[Any] = []
        self.url = ""
        self.whole: tuple[dict[str, int], int, int] = ({}, 0, 0)

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from moa_actors.app import THROUGHPUT_ENV, build_from_config
        from moa_actors.ray_here import RAY_HERE_ENV

        # Started on this machine as `moa serve` starts its Ray instance (RAY_HERE_ENV): no load
        # balancer to deregister from, so the stop does not wait out Serve's 30 s draining period.
        for key, value in {**THROUGHPUT_ENV, **RAY_HERE_ENV}.items():
            os.environ.setdefault(key, value)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": {"head_node": 1}, "include_dashboard": False},
        )
        self.workers = [self._add_worker(), self._add_worker()]
        ray.init(address=self.cluster.address, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_from_config(chaos_config(self.sim.url)), name="moa", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        # What "whole" is: the app as deployed and reporting healthy.
        self._until(self._healthz_ok, 300.0, "/healthz to say ok after the deploy")
        self.whole = self._shape()

    def _add_worker(self) -> Any:
        return self.cluster.add_node(num_cpus=1, resources={"provider_node": 1})

    def stop(self) -> None:
        """Every process of the cluster stops. No ``serve.shutdown()`` first: it would stop each
        replica gracefully, one by one, in a cluster whose processes are all killed next anyway."""
        import ray

        try:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            self.sim.stop()

    # -- whole again ------------------------------------------------------------------------------

    def _shape(self) -> tuple[dict[str, int], int, int]:
        """Running replicas per deployment, live named Serve actors (replicas and rate-limiter
        actors), live nodes."""
        import ray
        from ray import serve

        app = serve.status().applications.get("moa")
        running: dict[str, int] = {}
        if app is not None and app.status == "RUNNING":
            for name, d in app.deployments.items():
                states = {str(getattr(k, "value", k)): n for k, n in d.replica_states.items()}
                healthy = d.status == "HEALTHY" and set(states) <= {"RUNNING"}
                running[name] = states.get("RUNNING", 0) if healthy else -1
        named = sum(
            1
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["name"].startswith(("SERVE_REPLICA::", "SERVE_DEPLOYMENT_ACTOR::"))
        )
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        return running, named, nodes

    def _healthz_ok(self) -> bool:
        try:
            r = httpx.get(self.url + "/healthz", timeout=5)
            return r.status_code == 200 and r.json().get("status") == "ok"
        except (httpx.TransportError, ValueError):
            return False

    def wait_whole(self, within_s: float = 300.0) -> None:
        """Until the app is as deployed again: each deployment with as many replicas, all running,
        as at the start; as many named Serve actors alive (a killed one replaced, the rate-limiter
        actor recreated); as many live nodes; and ``/healthz`` ``ok``. Then the next scenario
        begins on a whole app, as soon as it is one."""
        self._until(
            lambda: self._shape() == self.whole and self._healthz_ok(),
            within_s,
            f"the app to come back whole (as deployed: {self.whole})",
        )

    @staticmethod
    def _until(condition: Any, within_s: float, what: str) -> None:
        end = time.monotonic() + within_s
        while not condition():
            if time.monotonic() > end:
                raise RuntimeError(f"waited {within_s:g} s for {what}")
            time.sleep(0.5)

    # -- the kills --------------------------------------------------------------------------------

    def kill(self, scenario: str) -> str:
        import ray

        if scenario == "node":
            victim = self.workers.pop(0)
            self.cluster.remove_node(victim)
            self.workers.append(self._add_worker())  # what an autoscaler would do
            return f"worker node {victim.node_id[:12]} (a replacement joined)"
        fragment, prefix = {
            "provider": ("#provider-openai#", "SERVE_REPLICA::"),
            "ingress": ("#ingress#", "SERVE_REPLICA::"),
            "health-board": (f"#{HEALTH_BOARD_NAME}#", "SERVE_REPLICA::"),
            "rate-limiter": ("provider-metered", "SERVE_DEPLOYMENT_ACTOR::"),
        }[scenario]
        actor = _named_actor(fragment, prefix)
        ray.kill(actor, no_restart=True)
        return {
            "provider": "one provider-openai replica",
            "ingress": "the ingress replica",
            "health-board": f"the health board's replica (deployment {HEALTH_BOARD_NAME!r})",
            "rate-limiter": "provider-metered's rate-limiter actor",
        }[scenario]

    # -- the load ---------------------------------------------------------------------------------

    async def _one(self, client: httpx.AsyncClient, kind: str, began: float) -> Outcome:
        body: dict[str, Any] = {"model": "moa-lite", "messages": QUESTION, "max_tokens": 48}
        if kind == "metered":
            # A short deadline: a request the budget cannot serve soon is refused (429) or ends
            # (504) at once, so the clients keep asking instead of queueing for the refill.
            body = {"model": METERED_MODEL, "messages": QUESTION, "max_tokens": 8, "moa": {"deadline_s": 1}}
        sent = time.monotonic()
        try:
            r = await client.post(self.url + "/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            return Outcome(kind, sent - began, time.monotonic() - sent, None, "hung")
        except httpx.TransportError:
            return Outcome(kind, sent - began, time.monotonic() - sent, None, "lost")
        took = time.monotonic() - sent
        if r.status_code == 200:
            return Outcome(kind, sent - began, took, 200, "answered")
        try:
            error = r.json()["error"]
            code = f"{error['code'] or error['type']}"
            return Outcome(kind, sent - began, took, r.status_code, "clean", code)
        except (ValueError, KeyError, TypeError):
            return Outcome(kind, sent - began, took, r.status_code, "unclean", r.text[:80])

    async def _loop(self, kind: str, began: float, until: float, out: list[Outcome], pause: float) -> None:
        timeout = httpx.Timeout(DEADLINE_S + HUNG_MARGIN_S, connect=10)
        async with httpx.AsyncClient(timeout=timeout) as client:
            while time.monotonic() < until:
                out.append(await self._one(client, kind, began))
                await asyncio.sleep(pause)

    async def _healthz_ok_after(self, killed: float, until: float) -> float | None:
        """Seconds from the kill until /healthz says ``ok`` again (first check 1 s after)."""
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < until:
                try:
                    r = await client.get(self.url + "/healthz")
                    if r.status_code == 200 and r.json().get("status") == "ok":
                        return time.monotonic() - killed
                except (httpx.TransportError, ValueError):
                    pass
                await asyncio.sleep(0.5)
        return None

    def run(self, scenario: str) -> ScenarioResult:
        """The load runs on a thread of its own (its own event loop); the kill happens on this,
        the main thread, which Ray's node management needs."""
        asyncio.run(self._reset_simulator())
        began = time.monotonic()
        until = began + self.seconds
        outcomes: list[Outcome] = []
        killed = threading.Event()
        health: list[float | None] = []

        async def load() -> None:
            loops = [self._loop("moa", began, until, outcomes, 0.05) for _ in range(self.concurrency)]
            # More than the metered budget: the limiter refuses or delays the rest.
            for _ in range(self.metered_clients):
                loops.append(self._loop("metered", began, until, outcomes, METERED_PAUSE_S))
            tasks = [asyncio.create_task(c) for c in loops]
            await asyncio.to_thread(killed.wait)
            health.append(await self._healthz_ok_after(killed_at, until + 30))
            await asyncio.gather(*tasks)

        loader = threading.Thread(target=asyncio.run, args=(load(),), name="chaos-load")
        loader.start()
        time.sleep(self.kill_at_s)
        killed_at = time.monotonic()
        what = self.kill(scenario)
        killed.set()
        loader.join()
        elapsed = time.monotonic() - began
        metered_sent = asyncio.run(self._metered_calls())
        return summarise(scenario, what, outcomes, killed_at - began, elapsed, health[0], metered_sent)

    async def _reset_simulator(self) -> None:
        async with httpx.AsyncClient() as c:
            (await c.post(self.sim.url + "/admin/reset", json={})).raise_for_status()

    async def _metered_calls(self) -> int:
        async with httpx.AsyncClient() as c:
            stats = (await c.get(self.sim.url + "/admin/stats")).json()
        return int(stats["models"].get(METERED_MODEL, {}).get("requests", 0))


def summarise(
    scenario: str,
    what: str,
    outcomes: list[Outcome],
    killed_at_s: float,
    elapsed: float,
    healthy_after: float | None,
    metered_sent: int,
) -> ScenarioResult:
    main = [o for o in outcomes if o.kind == "moa"]
    fates = Counter(o.fate for o in main)
    clean = Counter(f"{o.status} {o.code}" for o in main if o.fate == "clean")
    unclean = sorted({f"{o.status} {o.code!r}" for o in main if o.fate == "unclean"})
    # Full service: the last failure (of a request in flight at the kill or sent after it) ended.
    ended_failing = [o.sent + o.took for o in main if o.fate != "answered" and o.sent + o.took >= killed_at_s]
    recovered = max(ended_failing) - killed_at_s if ended_failing else 0.0
    # Requests sent after the last failure ended, all answered: service was back, by order of events.
    back = [o for o in main if o.sent >= killed_at_s + recovered]
    # A bucket holds at most a minute's budget and refills at rpm/60 a second.
    allowed = int(METERED_RPM + METERED_RPM * elapsed / 60.0)
    bound = allowed + (METERED_RPM if scenario == "rate-limiter" else 0)
    return ScenarioResult(
        scenario=scenario,
        killed=what,
        seconds=round(elapsed, 1),
        killed_at_s=round(killed_at_s, 1),
        requests=len(main),
        answered=fates["answered"],
        clean_failures=dict(clean),
        unclean=fates["unclean"],
        unclean_bodies=unclean[:3],
        lost=fates["lost"],
        hung=fates["hung"],
        recovered_after_s=round(max(0.0, recovered), 1),
        answered_after_recovery=sum(o.fate == "answered" for o in back),
        healthz_ok_after_s=None if healthy_after is None else round(healthy_after, 1),
        metered_asked=sum(1 for o in outcomes if o.kind == "metered"),
        metered_sent_to_provider=metered_sent,
        metered_allowed=allowed,
        metered_bound=bound,
        budget_held=metered_sent <= bound,
    )


def markdown(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    lines = [
        f"Load: {meta['concurrency']} clients sending `moa-lite` back to back, plus "
        f"`{METERED_MODEL}` ({meta['metered_clients']} clients, each asking again "
        f"{METERED_PAUSE_S:g} s after an answer or refusal) against a cluster-wide budget of "
        f"{METERED_RPM} RPM, whose bound is a "
        f"full bucket plus its refill (one more minute's budget when the limiter itself is killed); "
        f"each scenario {meta['seconds']:g} s, "
        f"the kill at {meta['kill_at_s']:g} s. "
        f"Request deadline {DEADLINE_S:g} s; hung = no answer {HUNG_MARGIN_S:g} s past it.",
        "",
        "| killed | moa-lite requests | answered | failed cleanly | unclean | lost | hung "
        "| all answered again after | /healthz ok after | metered asked / reached the provider / bound "
        "| budget held |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        clean = ", ".join(f"{n} x {k}" for k, n in sorted(r.clean_failures.items())) or "0"
        health = "-" if r.healthz_ok_after_s is None else f"{r.healthz_ok_after_s:g} s"
        lines.append(
            f"| {r.killed} | {r.requests} | {r.answered} | {clean} | {r.unclean} | {r.lost} | {r.hung} "
            f"| {r.recovered_after_s:g} s | {health} "
            f"| {r.metered_asked} / {r.metered_sent_to_provider} / {r.metered_bound} "
            f"| {'yes' if r.budget_held else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def run_all(chaos: Chaos, scenarios: list[str], say: Any) -> list[ScenarioResult]:
    results = []
    for i, scenario in enumerate(scenarios, 1):
        say(f"[{i}/{len(scenarios)}] {scenario}: {chaos.seconds:g} s of load, kill at {chaos.kill_at_s:g} s")
        result = chaos.run(scenario)
        say(
            f"    answered {result.answered}/{result.requests}, lost {result.lost}, hung {result.hung}, "
            f"all answered again after {result.recovered_after_s:g} s"
        )
        results.append(result)
        if i < len(scenarios):
            chaos.wait_whole()  # the killed part came back: the next scenario starts on a whole app
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moa_actors.chaos",
        description="Kill parts of a three-node Ray cluster under load; report what each cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("chaos-results"), help="where chaos.json and chaos.md go")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: " + ", ".join(SCENARIOS)
    )
    p.add_argument("--seconds", type=float, default=40.0, help="length of each scenario")
    p.add_argument("--kill-at", type=float, default=8.0, help="seconds into a scenario the kill happens")
    p.add_argument("--concurrency", type=int, default=4, help="moa-lite clients sending back to back")
    p.add_argument(
        "--metered-clients",
        type=int,
        default=METERED_CLIENTS,
        help=f"clients asking the metered model, each again {METERED_PAUSE_S:g} s after an answer or refusal",
    )
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.metered_clients < 1:
        p.error("--metered-clients must be at least 1")
    if not 0 < args.kill_at < args.seconds:
        p.error("--kill-at must fall within --seconds")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    chaos = Chaos(args.seconds, args.kill_at, args.concurrency, args.metered_clients)
    say("starting a three-node Ray cluster and the app (a minute or two)...")
    try:
        chaos.start()
        results = run_all(chaos, scenarios, say)
    finally:
        chaos.stop()
    meta = {
        "seconds": args.seconds,
        "kill_at_s": args.kill_at,
        "concurrency": args.concurrency,
        "metered_clients": args.metered_clients,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"options": meta, "metered_rpm": METERED_RPM, "scenarios": [asdict(r) for r in results]}
    (args.out / "chaos.json").write_text(json.dumps(report, indent=2))
    (args.out / "chaos.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    print(f"results in {args.out}/ (chaos.json, chaos.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
