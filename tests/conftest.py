"""Shared fixtures: one provider simulator per test session, reset between tests.

Tests talk to it over loopback with the official SDKs, exactly as production code talks to the real APIs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types as genai_types
from hypothesis import settings

from moa.config import MoAConfig, load_config, parse_config
from moa.engine.calls import WINDOWS
from moa.simulator.profile import ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer
from moa_observability.logs import JsonFormatter
from moa_observability.tracing import flush_tracing, setup_tracing
from tests.helpers import RAY_ADMIN_KEY, ApiServer, simulated
from tests.otlp_receiver import OTLPReceiver

if TYPE_CHECKING:
    from moa.providers.client import ProviderClient
    from tests.test_fidelity import FixtureServer

# Hypothesis' default 200 ms deadline per example measures the machine, not the property: on a
# loaded two-CPU machine a slow example is no bug. Properties are checked here; speed by moa bench.
settings.register_profile("moa", deadline=None)
settings.load_profile("moa")

ON_WORKER = {"resources": {"worker_node": 0.01}}
LEAK_CHECK_ENV = "MOA_LEAK_CHECK_API_KEY"
LEAK_CHECK_KEY = "sim-invalid-key-live-" + secrets.token_hex(16)
ON_HEAD = {"resources": {"head_node": 0.01}}

# Fast enough for a quick suite: 20 ms to the first token, then 8,000 tokens a second (a usual
# answer in tens of milliseconds: the suite's thousands of calls spent minutes generating at
# 2,000). A test that needs a call still running when it looks (concurrency, cancellation) holds
# it with a fault (hang, slow_stream, stall) or a pace of its own, never by this profile's speed.
FAST_TOKENS_PER_S = 8000.0
FAST_PROFILE = SimProfile(default=ModelProfile(ttft_s=0.02, tokens_per_s=FAST_TOKENS_PER_S, jitter=0.0))


@contextlib.contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Put the named environment variables back as they were (set or absent) on the way out:
    a session fixture that sets them for its own processes leaves no trace in the next one."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# The modules with Ray tests in them (marked `ray`, or on the session cluster). Two workers run the
# suite (pyproject.toml's addopts): these modules all go to one of them, in order, from the start;
# every other module goes whole to whichever worker is free. Checked at collection (below), so
# a module that gains a Ray test and is not named here stops the run rather than run beside Ray.
RAY_MODULES = frozenset(
    {
        "test_agents",
        "test_chaos",
        "test_monitoring",
        "test_observability",
        "test_operate",
        "test_serve",
        "test_serve_cache",
        "test_serve_claims",
        "test_serve_images",
        "test_serve_keys",
        "test_serve_streaming",
    }
)
# Set in each worker by pytest-xdist (gw0, gw1); absent when the suite runs in one process.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# How far the worker running in-process tests steps back from the CPUs (a nice value).
IN_PROCESS_NICE = 10


def on_ray(item: pytest.Item) -> bool:
    """A test that needs Ray: marked so (it starts a Ray instance of its own, or its module is on
    the cluster), or using the session cluster."""
    return item.get_closest_marker("ray") is not None or "cluster" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray modules first, so that their worker starts on them at once; within them, the
    modules on the session cluster last (each module whole, in the order they came): the cluster
    starts when the first of them needs it and stops with the session, after the tests that start
    a Ray instance of their own (test_chaos, test_operate), which never run beside it."""
    unnamed = sorted({item.path.stem for item in items if on_ray(item)} - RAY_MODULES)
    if unnamed:
        raise pytest.UsageError(f"tests/conftest.py: RAY_MODULES must name {', '.join(unnamed)}")
    on_cluster = {item.path for item in items if "cluster" in getattr(item, "fixturenames", ())}
    ordered = [i for i in items if i.path not in on_cluster] + [i for i in items if i.path in on_cluster]
    items[:] = [i for i in ordered if i.path.stem in RAY_MODULES] + [
        i for i in ordered if i.path.stem not in RAY_MODULES
    ]


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduling with the Ray modules as one scope: one worker runs them all, in
    the collection's order (--no-loadscope-reorder), one session cluster for the whole run, while
    the other worker takes the in-process modules one whole module at a time. (xdist's own
    `loadgroup` marks cannot do it here: they rename a test's node id, which pytest 9 no longer
    lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if Path(module).stem in RAY_MODULES else module

    return RayModulesTogether(config, log)


_stepped_back = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A worker's first in-process module lowers that worker's priority (and its children's) for
    the rest of the session: the Ray tests beside it drive load and wait on deadlines on the same
    two CPUs, and must get them as they would alone; an in-process test mostly waits on simulated
    time and loses little. The Ray worker comes here only once the Ray modules are done."""
    global _stepped_back
    if XDIST_WORKER and not _stepped_back and item.path.stem not in RAY_MODULES:
        os.nice(IN_PROCESS_NICE)
        _stepped_back = True


@pytest.fixture(scope="session", autouse=True)
def session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MOA_STATE_DIR for every test, a temporary directory: no test reads or writes the user's own
    state directory ($XDG_DATA_HOME/moa: their keys, ledger and cache), whatever it forgets to set.
    Tests that need a fresh one per test use ``state_dir``."""
    path = tmp_path_factory.mktemp("moa-state")
    with restored_environment("MOA_STATE_DIR"):
        os.environ["MOA_STATE_DIR"] = str(path)
        yield path


@pytest.fixture(autouse=True)
def _forget_learned_windows() -> Iterator[None]:
    """Context windows a test's providers named are this process's (``moa.engine.calls.WINDOWS``):
    forgotten after each test, so no test's small window trims another's references."""
    yield
    WINDOWS.clear()


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(FAST_PROFILE) as server:
        yield server


@pytest.fixture
def sim(simulator: SimulatorServer) -> Iterator[SimulatorServer]:
    """The session simulator with counters, faults and profile reset before each test."""
    httpx.post(
        f"{simulator.url}/admin/reset", json={"profile": FAST_PROFILE.model_dump(mode="json")}
    ).raise_for_status()
    yield simulator


@pytest.fixture
def config(sim: SimulatorServer) -> MoAConfig:
    """The bundled default config, pointed at the session simulator."""
    return simulated(sim)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory (keys, spend ledger, cache file) for this test, as MOA_STATE_DIR."""
    monkeypatch.setenv("MOA_STATE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def api_url(sim: SimulatorServer) -> Iterator[str]:
    """The in-process API on the bundled default config over the simulator, fresh per test (a
    module that needs another config defines its own)."""
    with ApiServer(simulated(sim)) as server:
        yield server.url


@pytest.fixture
def client(api_url: str) -> openai.OpenAI:
    """The official ``openai`` client of ``api_url``, without retries: a test sees every failure."""
    return openai.OpenAI(base_url=api_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def served() -> Iterator[FixtureServer]:
    """A loopback server answering with the providers' recorded bodies and keeping what it was
    sent (the adapters' tests hold requests to the published ones), one per module."""
    from tests.test_fidelity import FixtureServer  # the test module imports this one's helpers

    with FixtureServer() as server:
        yield server


@pytest.fixture
async def served_clients(served: FixtureServer) -> AsyncIterator[dict[str, ProviderClient]]:
    """The OpenAI, Anthropic and Gemini adapters, each pointed at ``served``."""
    from tests.test_fidelity import client_for

    made = {p: client_for(p, served.url) for p in ("openai", "anthropic", "gemini")}
    yield made
    for c in made.values():
        await c.aclose()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server for the session, on a free loopback port with its own temp dir."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="moa-redis-") as tmp:
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                tmp,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        try:
            from tests.waiting import wait_until_sync

            wait_until_sync(up, what="redis-server to answer PING")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="session")
def otlp() -> Iterator[OTLPReceiver]:
    """A real OTLP/HTTP receiver; this process and every Ray worker started later export to it."""
    receiver = OTLPReceiver().start()
    with restored_environment("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"):
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
        os.environ["OTEL_SERVICE_NAME"] = "moa"
        setup_tracing({"test.process": "pytest"})
        yield receiver
        flush_tracing()
        receiver.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _test_config(sim_url: str) -> MoAConfig:
    """The bundled config plus two test providers; providers on the worker node, the rest on the head."""
    raw = load_config(None).model_dump(mode="json")
    for p in raw["providers"].values():
        p["deployment"] = {"num_cpus": 0.05, "num_replicas": 1, **ON_WORKER}
    raw["providers"]["openai"]["deployment"] = {
        "num_cpus": 0.05,
        **ON_WORKER,
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 600,
            "look_back_period_s": 2,
        },
    }
    # Concurrency 2 per replica, two replicas: never more than 4 calls in flight. OpenAI's kind,
    # as the other test providers: each replica then imports the one SDK the session's other
    # replicas import most (anthropic's alone takes a second of the worker node's one CPU).
    raw["providers"]["narrow"] = {
        "kind": "openai",
        "api_key_env": "NARROW_API_KEY",
        "limits": {"concurrency": 2},
        "deployment": {"num_cpus": 0.05, "num_replicas": 2, **ON_WORKER},
        "models": {"narrow-model": {"input_per_mtok": 1, "output_per_mtok": 2}},
    }
    # Sixty requests a minute for the whole account, whatever the replica count: enough for each
    # replica to lease a slice (one request a second), so the test covers leases too.
    raw["providers"]["metered"] = {
        "kind": "openai",
        "api_key_env": "METERED_API_KEY",
        "limits": {"rpm": 60},
        "deployment": {"num_cpus": 0.05, "num_replicas": 2, **ON_WORKER},
        "models": {"metered-model": {}},
    }
    # Three thousand tokens a minute for the account across two replicas (a lease of 50 tokens
    # is less than one call, so most calls reserve at the limiter actor itself).
    raw["providers"]["tokened"] = {
        "kind": "openai",
        "api_key_env": "TOKENED_API_KEY",
        "limits": {"tpm": 3000},
        "deployment": {"num_cpus": 0.05, "num_replicas": 2, **ON_WORKER},
        "models": {"tokened-model": {}},
    }
    raw["simulator"] = {"mode": "on", "url": sim_url}
    raw["serve"] = {
        "ingress": {"num_cpus": 0.1, "num_replicas": 1, **ON_HEAD},
        "health_board": {"num_cpus": 0.05, "num_replicas": 1, **ON_HEAD},
        "aggregator": {"num_cpus": 0.05, "num_replicas": 1, **ON_HEAD},
    }
    raw["server"] = {
        "max_request_bytes": 20_000,
        "max_concurrent_requests": 128,
        "request_deadline_s": 60,
        "sse_keepalive_s": 0.5,  # short, so a test sees keep-alives through Serve's proxy
    }
    return parse_config(raw, "the test config")


@pytest.fixture(scope="session")
def cluster(simulator: SimulatorServer, otlp: OTLPReceiver) -> Iterator[dict[str, Any]]:
    """One two-node Ray cluster for the session (both nodes on this machine), the app deployed.

    Started after the OTLP receiver so every Ray worker inherits the trace endpoint.
    """
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from ray.cluster_utils import Cluster

    # The mode moa serve and the cluster files run in.
    from moa_actors.app import THROUGHPUT_ENV, build_from_config

    with restored_environment(LEAK_CHECK_ENV, *THROUGHPUT_ENV, *CLUSTER_ENV):
        yield from _cluster(ray, serve, Cluster, build_from_config, simulator)


# The session cluster's timings. Autoscaling decisions need fresh metrics; Serve's defaults push
# them every 10 s. Ray exports metrics every 10 s by default, and tests that read a series on the
# Prometheus endpoint waited for it: every 2 s. With direct ingress a deleted app's ingress replica
# stays reachable for Serve's draining period (30 s by default, for load balancers to deregister
# it): 8 s still shows the drain (test_serve.py). Tests delete their own apps without waiting for
# it (tests.helpers.delete_app).
CLUSTER_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "8",
    "RAY_metrics_report_interval_ms": "2000",
}


def _cluster(
    ray: Any, serve: Any, cluster_class: Any, build_from_config: Any, simulator: SimulatorServer
) -> Iterator[dict[str, Any]]:
    from moa_actors.app import THROUGHPUT_ENV

    # A live-looking key the simulator refuses (and, like OpenAI, echoes masked), in every Ray
    # worker's environment: the leak tests deploy an app that reads it as a real deployment would.
    os.environ[LEAK_CHECK_ENV] = LEAK_CHECK_KEY
    # Its replicas' admin key (they inherit the environment the nodes start with): /healthz
    # shows per-provider detail only to it. Taken out of this process once the app runs.
    os.environ["MOA_ADMIN_KEY"] = RAY_ADMIN_KEY
    for key, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(CLUSTER_ENV)
    head_metrics, worker_metrics = _free_port(), _free_port()
    c = cluster_class(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head_node": 1},
            "include_dashboard": False,
            "metrics_export_port": head_metrics,
        },
    )
    worker = c.add_node(num_cpus=1, resources={"worker_node": 1}, metrics_export_port=worker_metrics)
    ray.init(address=c.address, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = _test_config(simulator.url)
    serve.run(build_from_config(cfg), name="moa", route_prefix="/")
    os.environ.pop("MOA_ADMIN_KEY", None)
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "address": c.address,  # Ray's, for a process of its own to join the cluster
            "config": cfg,
            "worker_node": worker.node_id,
            "metrics": {"head": head_metrics, "worker": worker_metrics},
        }
    finally:
        # No serve.shutdown() first: it would wait out every ingress replica's draining period
        # for a cluster whose processes are all stopped next anyway.
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def url(cluster: dict[str, Any], sim: SimulatorServer) -> str:
    """The session Ray app's URL (modules testing the in-process API define a ``url`` of their own)."""
    return str(cluster["url"])


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything the moa loggers write, as the JSON lines a deployment emits."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("moa")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield buf
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# The official SDKs' clients on the session simulator, for the modules that drive its wires
# directly (tool calling, structured outputs). Each such module defines its own ``http`` fixture,
# which loads its simulator profile first; these clients depend on it.
SIM_KEY = "sim-test-key"


@pytest.fixture
def oai(http: httpx.Client, sim: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key=SIM_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(http: httpx.Client, sim: SimulatorServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=sim.url, api_key=SIM_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def gem(http: httpx.Client, sim: SimulatorServer) -> Iterator[genai.Client]:
    options = genai_types.HttpOptions(
        base_url=sim.url, api_version="v1beta", retry_options=genai_types.HttpRetryOptions(attempts=1)
    )
    client = genai.Client(api_key=SIM_KEY, http_options=options)
    yield client
    client.close()
