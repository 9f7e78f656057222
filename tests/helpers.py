"""Helpers shared by the test modules: one home instead of a copy in each file.

- the provider simulator's admin API: faults, counters, parsed requests, waiting until idle;
- ``ApiServer``: ``moa serve --local``'s own server (``moa.local.LocalServer``, the production
  wiring) on a loopback port, in a thread with its own event loop;
- traces: waiting for spans at the OTLP receiver, picking them by name.

Fixtures live in conftest.py; these are plain functions and classes a test imports. Waiting is
on conditions (tests/waiting.py), never on the clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest

from moa.config import MoAConfig, SimulatorMode, load_config
from moa.local import LocalServer
from moa.service import claim_port
from moa.simulator.profile import JsonErrors, ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer
from moa.state import StateStore
from moa.types import ToolSpec
from moa_observability.tracing import flush_tracing
from tests.otlp_receiver import OTLPReceiver
from tests.waiting import wait_until, wait_until_sync

QUESTION = [{"role": "user", "content": "How do vaccines train the immune system?"}]

# The session Ray app's admin key (MOA_ADMIN_KEY in its replicas' environment): /healthz shows
# per-provider detail only to it.
RAY_ADMIN_KEY = "adm-ray-session-" + "k" * 24
ADMIN_HEADERS = {"Authorization": f"Bearer {RAY_ADMIN_KEY}"}

# The simulator, by its server (a fresh connection per call) or a client already open on its URL
# (test_simulator keeps one per module: each new connection costs tens of milliseconds).
Sim = SimulatorServer | httpx.Client


def _admin(sim: Sim, method: str, path: str, **kwargs: Any) -> httpx.Response:
    # Plain blocking calls are fine: the simulator runs on its own thread and loop.
    if isinstance(sim, httpx.Client):
        return sim.request(method, path, **kwargs)
    return httpx.request(method, f"{sim.url}{path}", **kwargs)


# -- the simulator's admin API ------------------------------------------------------------------------


def set_fault(sim: Sim, model: str, **faults: dict[str, Any]) -> None:
    """Inject faults for ``model`` (``*``: every model), e.g. ``hang={"rate": 1.0}``."""
    _admin(sim, "PUT", f"/admin/faults/{model}", json=faults).raise_for_status()


def clear_faults(sim: Sim, model: str) -> None:
    _admin(sim, "DELETE", f"/admin/faults/{model}").raise_for_status()


def set_pace(sim: Sim, ttft_s: float, tokens_per_s: float) -> None:
    """Every model answers at this pace (no jitter), until the next test's reset. It replaces the
    whole profile: faults set before it are gone."""
    profile = {"default": {"ttft_s": ttft_s, "tokens_per_s": tokens_per_s, "jitter": 0.0}}
    _admin(sim, "PUT", "/admin/profile", json=profile).raise_for_status()


# A model as fast as the machine lets it be: the adapters' tests are about bodies, not pace.
FAST_MODEL = ModelProfile(ttft_s=0.005, tokens_per_s=20_000.0, jitter=0.0)


def json_errors(sim: Sim, model: str, **errors: float) -> None:
    """Every model at ``FAST_MODEL``'s pace, ``model`` writing its structured documents wrong (or
    refusing) at the rates given (``JsonErrors``' fields); none given: every document right."""
    wrong = FAST_MODEL.model_copy(update={"json_errors": JsonErrors(**errors)})
    body = SimProfile(default=FAST_MODEL, models={model: wrong}).model_dump(mode="json")
    _admin(sim, "PUT", "/admin/profile", json=body, timeout=10).raise_for_status()


def sim_stats(sim: Sim) -> dict[str, Any]:
    """Per-model counters: requests, in_flight, completed, cancelled, ..."""
    models: dict[str, Any] = _admin(sim, "GET", "/admin/stats").json()["models"]
    return models


def model_stats(sim: Sim, model: str) -> dict[str, Any]:
    """One model's counters (zeros when it was never called)."""
    return sim_stats(sim).get(model, {"requests": 0, "in_flight": 0})


def sim_total_requests(sim: Sim) -> int:
    """Requests the simulator received since its last reset, every model included."""
    return int(_admin(sim, "GET", "/admin/stats").json()["total_requests"])


def sim_in_flight(sim: Sim) -> int:
    return sum(m["in_flight"] for m in sim_stats(sim).values())


def sim_requests(sim: Sim) -> list[dict[str, Any]]:
    """What the last requests carried, as the simulator parsed them (oldest first)."""
    requests: list[dict[str, Any]] = _admin(sim, "GET", "/admin/requests").json()["requests"]
    return requests


async def wait_idle(sim: Sim, model: str | None = None, *, interval: float = 0.02) -> dict[str, Any]:
    """Wait until nothing (or ``model``) has a request in flight at the simulator: proof that
    cancelled or abandoned calls really ended. Returns every model's counters (or ``model``'s)."""
    if model is not None:
        return await wait_until(
            lambda: model_stats(sim, model),
            lambda s: s["in_flight"] == 0,
            interval=interval,
            what=f"no {model} request in flight",
        )
    return await wait_until(
        lambda: sim_stats(sim),
        lambda s: all(m["in_flight"] == 0 for m in s.values()),
        interval=interval,
        what="no request in flight at the simulator",
    )


# -- apps of a test's own on the session Ray cluster -----------------------------------------------


def simulated(sim: SimulatorServer, **update: Any) -> MoAConfig:
    """The bundled default config pointed at the simulator, with these top-level fields replaced."""
    cfg = load_config(None)
    simulator = cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})
    return cfg.model_copy(update={"simulator": simulator, **update})


def trimmed_config(
    config: MoAConfig, providers: Iterable[str] = ("openai", "anthropic", "gemini"), *, budgets: bool = False
) -> dict[str, Any]:
    """``config`` raw, trimmed to what a test's service needs: only the ``providers`` its tests
    call, and none with an RPM or TPM budget unless ``budgets`` (each budget is one more actor to
    start on Ray, a rate limiter such a service is not there to test). Presets naming another
    provider go; ``single`` keeps the part of its chain that is left, and a router tier whose
    preset went runs ``single``. On Ray every provider is one more replica, one more process to
    start on the two CPUs: an app beside the session's (whose config, tests/conftest.py, is the
    usual ``config``) with openai alone deploys in about half the time of one with all three."""
    keep = set(providers)
    raw = config.model_dump(mode="json")
    raw["providers"] = {name: p for name, p in raw["providers"].items() if name in keep}
    if not budgets:
        for p in raw["providers"].values():
            p["limits"]["rpm"] = p["limits"]["tpm"] = None

    def kept(refs: list[dict[str, Any]]) -> bool:
        return all(r["provider"] in keep for r in refs)

    presets = {}
    for name, preset in raw["presets"].items():
        if name == "single":
            preset["aggregators"] = [a for a in preset["aggregators"] if a["provider"] in keep]
        refs = [p for layer in preset.get("layers") or [] for p in layer["proposers"]]
        refs += [preset["self_moa"]] if preset.get("self_moa") else []
        refs += (preset.get("aggregators") or []) + (preset.get("fallbacks") or [])
        if kept(refs) and preset.get("aggregators"):
            presets[name] = preset
    raw["presets"] = presets
    router = raw["router"]
    router["tiers"] = {tier: (p if p in presets else "single") for tier, p in router["tiers"].items()}
    router["specialists"] = {task: ps for task, ps in router["specialists"].items() if kept(ps)}
    return raw


def delete_app(name: str) -> None:
    """Delete a test's own Serve app without waiting for it to go. A blocking delete waits out
    its ingress replica's draining period (8 s on the session cluster) for nothing the next test
    needs: every app has a name and route prefix of its own, and the CPU slices its replicas hold
    while they stop are spare on the nodes (at worst the next deploy waits for them, as this
    delete would have)."""
    from ray import serve

    serve.delete(name, _blocking=False)


# -- the API in-process -------------------------------------------------------------------------------


class ApiServer:
    """``moa serve --local``'s server on a loopback port, in a thread with its own event loop.

    It is the production wiring (``LocalServer`` over ``local_app``), not a copy: what the tests
    exercise is what ``moa serve --local`` runs.
    """

    def __init__(
        self, config: MoAConfig, store: Callable[[], StateStore] | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.config = config
        self.server = LocalServer(config, claim_port(host, 0), store)
        self.url = self.server.url
        self._ready = threading.Event()

    def __enter__(self) -> ApiServer:
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.run(on_ready=lambda _: self._ready.set())), daemon=True
        )
        self.thread.start()
        wait_until_sync(self._ready.is_set, what="the API server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.thread.join(30)


def non_loopback_address() -> str | None:
    """An address of this machine beyond loopback (the interface a default route would use), to
    reach a server bound to 0.0.0.0 as a client on the network would; None if it has none."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # TEST-NET-2; no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


# -- traces -------------------------------------------------------------------------------------------


def wait_for_spans(otlp: OTLPReceiver, trace_id: str, names: set[str]) -> list[dict[str, Any]]:
    """Spans arrive in batches from several processes: wait until every expected name is there."""
    spans: list[dict[str, Any]] = []

    def arrived() -> set[str]:
        nonlocal spans
        flush_tracing()
        spans = otlp.trace(trace_id)
        return {s["name"] for s in spans}

    wait_until_sync(arrived, names.issubset, interval=0.2, what=f"spans {sorted(names)} of {trace_id}")
    return spans


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


# The marks of a module of Ray tests: run with -m ray. (Serve's warning about the session app's
# short autoscaling look-back is filtered for every module, with its reason, in pyproject.toml.)
RAY_MODULE = [pytest.mark.ray]


# The tools of the providers' published tool-calling examples (the weather one; a second, ours,
# for parallel calls), as the adapters' tests declare them.
TOOL_WEATHER = ToolSpec(
    name="get_weather",
    description="Get the current weather in a given location",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
)
TOOL_TIME = ToolSpec(
    name="get_time",
    description="Get the current time in a timezone",
    parameters={
        "type": "object",
        "properties": {"timezone": {"type": "string"}, "hours": {"type": "integer"}},
        "required": ["timezone", "hours"],
    },
)


def kept_alive_gets(url: str, path: str, n: int = 15) -> list[float]:
    """Seconds each of ``n`` ``GET path`` requests took on one kept-alive connection to ``url``,
    each read to the end of its body: how long a server holds its answers (a connection's first
    few segments are acknowledged at once, so only the later requests show a delayed ACK)."""
    import socket
    import time

    host, port = url.removeprefix("http://").rsplit(":", 1)
    times = []
    with socket.create_connection((host.strip("[]"), int(port))) as conn:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: moa\r\n\r\n".encode())
            data = b""
            while True:
                chunk = conn.recv(65536)
                assert chunk, "the server closed the connection"
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                lengths = [x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")]
                if sep and lengths and len(body) >= int(lengths[0].split(b":")[1]):
                    break
            times.append(time.perf_counter() - t0)
    return times
