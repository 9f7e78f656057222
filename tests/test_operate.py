"""Operating the service as its users do: ``moa serve`` in a process of its own, a port already
taken, SIGTERM and SIGINT (also with SIGINT ignored, as for a background job), the drain, and what
the start-up banner promises (metrics, dashboard, ``serve status``, tracing).

The Ray variants start a Ray instance of their own (``pytest -m ray`` selects them); the
``--local`` variants need none. Every wait is on a condition; process time-outs are safety nets.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import httpx
import pytest

from moa.config import MoAConfig, load_config
from tests.helpers import non_loopback_address, trimmed_config
from tests.otlp_receiver import OTLPReceiver
from tests.waiting import wait_until, wait_until_sync

# A direct call to gpt-4.1 streams for about 100 s (too long for any drain here); one to
# gpt-4.1-mini for about 2 s (done well within the drain). Everything else answers at once.
SLOW_SIM = """\
default: {ttft_s: 0.01, tokens_per_s: 4000, jitter: 0}
models:
  gpt-4.1: {ttft_s: 0.05, tokens_per_s: 4, jitter: 0, output_tokens: [400, 400]}
  gpt-4.1-mini: {ttft_s: 0.05, tokens_per_s: 20, jitter: 0, output_tokens: [40, 40]}
"""
# Four times the short answer: it finishes within the drain however late in its answer the
# signal comes, and the long one is cut at the drain's end.
DRAIN_S = 8.0
QUESTION = [{"role": "user", "content": "Explain how TCP congestion control works."}]
# Generous: a loaded two-CPU machine may take a minute or more to start Ray and deploy.
START_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without provider keys, MOA_CONFIG or any OTLP export setting, nor the
    session cluster's Serve draining period (tests/conftest.py's CLUSTER_ENV, set while that
    cluster runs): `moa serve` sets its own (RAY_HERE_ENV) only where none is set, and would stop
    as no user's does, waiting out a drain for load balancers it has not got."""
    drop = ("MOA_CONFIG", "RAY_ADDRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_API_KEY") and not k.startswith("OTEL_") and k not in drop
    }
    return env | extra


@pytest.fixture
def slow_config(tmp_path: Path) -> Path:
    """The bundled config with openai alone (every model these tests call is openai's: the
    service starts without importing, or on Ray deploying, the two others) and the slow profile."""
    profile = tmp_path / "sim.yaml"
    profile.write_text(SLOW_SIM)
    raw = trimmed_config(load_config(None), ("openai",), budgets=True)
    raw["simulator"] = {"mode": "auto", "profile": str(profile)}
    raw["server"]["drain_s"] = DRAIN_S
    path = tmp_path / "moa.yaml"
    path.write_text(json.dumps(raw))
    return path


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self) -> str:
        return f"moa serve stdout:\n{self.stdout()[-3000:]}\nmoa serve stderr:\n{self.stderr()[-3000:]}"

    def wait_ready(self) -> None:
        def answers() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"moa serve exited with {self.proc.returncode}: {self.stderr()[-3000:]}")
            try:
                return httpx.get(self.url + "/v1/models", timeout=5).status_code
            except httpx.TransportError:
                return None

        wait_until_sync(answers, lambda s: s == 200, within_s=START_S, interval=0.5, what="moa serve up")
        wait_until_sync(self.stdout, lambda out: "Ctrl-C or SIGTERM" in out, what="the banner")


def start_serve(
    tmp_path: Path, *args: str, port: int, ignore_sigint: bool = False, env: dict[str, str] | None = None
) -> Served:
    out, err = tmp_path / f"serve-{port}.out", tmp_path / f"serve-{port}.err"

    def background_job() -> None:
        # What a non-interactive shell does to `moa serve &`: SIGINT ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "moa.cli", "serve", "--port", str(port), *args],
        stdout=out.open("wb"),
        stderr=err.open("wb"),
        env=env or clean_env(),
        preexec_fn=background_job if ignore_sigint else None,
    )
    return Served(proc, f"http://127.0.0.1:{port}", out, err)


def stop_if_running(served: Served) -> None:
    """Safety net for a failed test: the process (and with it its Ray instance) is stopped."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(120)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(30)


@dataclass
class StreamLog:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  # the data: payloads, in order

    def content(self) -> str:
        text = ""
        for e in self.events:
            if e != "[DONE]":
                body = json.loads(e)
                for choice in body.get("choices", []):
                    text += choice["delta"].get("content") or ""
        return text


async def read_stream(client: httpx.AsyncClient, url: str, model: str, log: StreamLog) -> None:
    body = {"model": model, "messages": QUESTION, "stream": True}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        log.status, log.headers = r.status_code, dict(r.headers)
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                log.events.append(line.removeprefix("data: "))


async def drain_scenario(served: Served, sig: signal.Signals) -> tuple[StreamLog, StreamLog]:
    """Two streams in flight, then ``sig``: the short one finishes, the long one is cut at the
    end of the drain with an error event and [DONE]; meanwhile a new request gets 503."""
    short, long = StreamLog(), StreamLog()
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=300)) as client:
        tasks = [
            asyncio.create_task(read_stream(client, served.url, "openai/gpt-4.1", long)),
            asyncio.create_task(read_stream(client, served.url, "openai/gpt-4.1-mini", short)),
        ]
        # Both answers are under way: text has arrived on each.
        await wait_until(lambda: bool(long.content() and short.content()), what="both streams started")
        served.proc.send_signal(sig)

        async def health() -> tuple[int, Any]:
            r = await client.get(served.url + "/healthz")
            return r.status_code, r.json()

        # The drain began: health says so, and a new request is refused with 503 and Retry-After.
        _, body = await wait_until(
            health, lambda h: h[0] == 503, interval=0.2, what="/healthz during the drain"
        )
        assert body["status"] == "draining"
        r = await client.post(
            served.url + "/v1/chat/completions", json={"model": "openai/gpt-4.1-mini", "messages": QUESTION}
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "shutting_down"
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=DRAIN_S + 120)
    return short, long


def assert_drained(short: StreamLog, long: StreamLog) -> None:
    # The short answer finished during the drain, as any answer would.
    assert short.status == 200 and short.events[-1] == "[DONE]"
    finish = [
        json.loads(e)["choices"][0]["finish_reason"] for e in short.events[:-1] if json.loads(e)["choices"]
    ]
    assert finish[-1] == "stop"
    # The long one was cut at the end of the drain: an OpenAI-style error event, then [DONE].
    assert long.status == 200 and long.events[-1] == "[DONE]"
    error = json.loads(long.events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    assert len(long.content()) > 0


# -- a port already in use ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["--local"], []], ids=["local", "ray"])
def test_a_port_in_use_is_refused_before_anything_starts(
    tmp_path: Path, slow_config: Path, mode: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ray_tmp = tmp_path / "ray"
        ray_tmp.mkdir()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "moa.cli",
                "serve",
                *mode,
                "--port",
                str(port),
                "--config",
                str(slow_config),
            ],
            env=clean_env(RAY_TMPDIR=str(ray_tmp)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1, out
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr
    # That line alone: no access notice ("the service is OPEN ...") for a service that never runs.
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # No Ray instance was started: none wrote its session directory.
    assert list(ray_tmp.iterdir()) == []


# -- the banner's calls --------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [False, True], ids=["open", "with-a-key"])
def test_the_banners_curl_works_as_printed(tmp_path: Path, slow_config: Path, keys: bool) -> None:
    """The ``curl`` the banner prints, run by a shell as printed (with ``$MOA_API_KEY`` set, as
    the banner says, once a key exists), gets a 200: with a key in the store it once printed a
    keyless curl, which got a 401."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    env = clean_env(MOA_STATE_DIR=str(tmp_path / "state"))
    if keys:
        created = subprocess.run(
            [sys.executable, "-m", "moa.cli", "keys", "create", "newcomer"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        env["MOA_API_KEY"] = created.stdout.strip()
    served = start_serve(tmp_path, "--local", "--config", str(slow_config), port=free_port(), env=env)
    try:
        wait_until_sync(
            served.stdout, lambda out: "Ctrl-C or SIGTERM" in out, within_s=START_S, what="the banner"
        )
        (curl,) = [line.strip() for line in served.stdout().splitlines() if line.strip().startswith("curl ")]
        done = subprocess.run(
            ["sh", "-c", f"{curl} -s -o /dev/null -w '%{{http_code}}'"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "200", (curl, done)
        # And the call it replaced: without a key, a 401 once a key exists.
        assert httpx.get(served.url + "/v1/models", timeout=10).status_code == (401 if keys else 200)
    finally:
        stop_if_running(served)


# -- drain and signals without Ray -----------------------------------------------------------------


@pytest.fixture
def local_serve(tmp_path: Path, slow_config: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    served = start_serve(
        tmp_path, "--local", "--config", str(slow_config), port=free_port(), ignore_sigint=request.param
    )
    try:
        served.wait_ready()
        yield served
    finally:
        stop_if_running(served)


@pytest.mark.parametrize(
    ("local_serve", "sig"),
    [(False, signal.SIGTERM), (True, signal.SIGINT)],
    indirect=["local_serve"],
    ids=["sigterm", "sigint-in-background"],
)
def test_local_serve_drains_on_a_signal_then_exits_0(local_serve: Served, sig: signal.Signals) -> None:
    assert "local: one process, no Ray" in local_serve.stdout()
    assert "answers are synthetic" in local_serve.stdout()  # no key: the README's promise
    short, long = asyncio.run(drain_scenario(local_serve, sig))
    assert_drained(short, long)
    assert local_serve.proc.wait(60) == 0, local_serve.stderr()
    assert "1 request(s) still running were ended" in local_serve.stderr()
    # No OTLP export configured: the trace id comes back all the same.
    assert re.fullmatch(r"[0-9a-f]{32}", short.headers["x-moa-trace-id"])


# -- on Ray ---------------------------------------------------------------------------------------


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("ray.serve", logging.INFO, "api.py", 1, message, args, None)


def test_quiet_serve_drops_only_the_lines_that_look_like_failure() -> None:
    """``moa serve``'s filter on Serve's logger, on records shaped like the lines a clean run
    printed: the two that read as trouble go, Serve's other records stay."""
    ray_here = pytest.importorskip("moa_actors.ray_here")
    quiet = ray_here.QuietServe()
    noise = [
        _record(
            'Connecting to existing Serve app in namespace "serve". '
            "New http_options/controller_options will not be applied."
        ),
        _record(
            "Started %s.", "<ray.serve._private.router.SharedRouterLongPollClient object at 0x7fd2fc1c97d0>"
        ),
    ]
    assert [r for r in noise if quiet.filter(r)] == []
    kept = [
        _record('Started Serve in namespace "serve".'),
        _record("Application 'moa' is ready at http://127.0.0.1:8000/."),
        _record("Controller failed to shut down within 30.0s. Check controller logs for more details."),
        _record("Started <ray.serve._private.router.SomethingElse object at 0x1>."),
    ]
    assert all(quiet.filter(r) for r in kept)


def test_quiet_stop_drops_only_the_raylet_reports_of_killed_actors() -> None:
    """``moa serve``'s stop, on writes shaped as Ray's error listener makes them (one ``print``:
    the coloured report, then the line end): the reports of the actors the stop kills go, with
    their line ends; every other line, the raylet's included, passes as written."""
    ray_here = pytest.importorskip("moa_actors.ray_here")
    out = io.StringIO()
    quiet = ray_here.QuietStop(out)
    killed = (
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite"
        " retries remaining, so the task will be retried. Error: The actor is dead because it was"
        " killed by `ray.kill`."
    )
    traceback = (
        "\x1b[33m(raylet)\x1b[0m Traceback (most recent call last):\n  File ...\n"
        "ray.exceptions.ActorDiedError: The actor died ... because it was killed by `ray.kill`."
    )
    kept = [
        "Stopping Serve and Ray...",
        "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an"
        " unexpected system error.",
        "ray.kill is what ended it",
    ]
    for text in [killed, traceback, *kept]:
        print(text, file=cast(TextIO, quiet))
    assert out.getvalue() == "".join(f"{line}\n" for line in kept)


def test_a_second_signal_ends_the_requests_in_progress_at_once(tmp_path: Path, slow_config: Path) -> None:
    # A drain of an hour: only the second signal can end the stream within this test.
    raw = json.loads(slow_config.read_text())
    raw["server"]["drain_s"] = 3600
    slow_config.write_text(json.dumps(raw))
    served = start_serve(tmp_path, "--local", "--config", str(slow_config), port=free_port())

    async def scenario() -> StreamLog:
        log = StreamLog()
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=300)) as client:
            task = asyncio.create_task(read_stream(client, served.url, "openai/gpt-4.1", log))
            await wait_until(lambda: bool(log.content()), what="the stream started")
            served.proc.send_signal(signal.SIGTERM)

            async def draining() -> int:
                return (await client.get(served.url + "/healthz")).status_code

            await wait_until(draining, lambda status: status == 503, what="the drain")
            served.proc.send_signal(signal.SIGINT)  # Ctrl-C again
            await asyncio.wait_for(task, timeout=120)
        return log

    try:
        served.wait_ready()
        log = asyncio.run(scenario())
        assert log.events[-1] == "[DONE]" and json.loads(log.events[-2])["error"]["code"] == "shutting_down"
        assert served.proc.wait(60) == 0, served.stderr()
    finally:
        stop_if_running(served)


def test_local_serve_exports_traces_and_writes_json_logs(
    tmp_path: Path, slow_config: Path, otlp: OTLPReceiver
) -> None:
    """moa serve --local sets up what a Ray replica does: OTLP export, JSON log lines."""
    env = clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url)
    served = start_serve(tmp_path, "--local", "--config", str(slow_config), port=free_port(), env=env)
    try:
        served.wait_ready()
        assert f"Tracing: OTLP export to {otlp.url}" in served.stdout()
        body = {"model": "openai/gpt-4o-mini", "messages": QUESTION}
        r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        trace_id = r.headers["x-moa-trace-id"]
        served.proc.send_signal(signal.SIGTERM)  # the exporter flushes on the way out
        assert served.proc.wait(60) == 0
        spans = wait_until_sync(
            lambda: otlp.trace(trace_id),
            lambda s: {"POST /v1/chat/completions", "moa.run", "chat gpt-4o-mini"} <= {x["name"] for x in s},
            what="the request's spans",
        )
        assert {s["resource"].get("moa.mode") for s in spans} == {"local"}
        lines = [json.loads(x) for x in served.stderr().splitlines() if x.startswith("{")]
        calls = [x for x in lines if x.get("event") == "provider_call" and x.get("trace_id") == trace_id]
        assert [(c["model"], c["status"]) for c in calls] == [("gpt-4o-mini", "ok")]
    finally:
        stop_if_running(served)


@pytest.mark.ray
def test_ray_serve_stopped_while_starting_cleans_up(tmp_path: Path, slow_config: Path) -> None:
    """A SIGTERM while the app deploys aborts start-up cleanly. (Ray's core worker installs a
    SIGTERM handler of its own that aborted the process, exit 134, leaving Ray's agents behind.)"""
    served = start_serve(tmp_path, "--config", str(slow_config), port=free_port())
    try:
        wait_until_sync(
            served.stderr, lambda err: "Started Serve in namespace" in err, within_s=START_S, interval=0.2
        )
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(120) == 130, served.stderr()[-3000:]
        assert "SIGTERM received" not in served.stderr()
    finally:
        stop_if_running(served)


# -- Ray's own tools: `ray start --head`, then `serve deploy` of the local recipe -----------------


def _ray_cli(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.ray
def test_the_local_recipe_on_ray_start_and_moa_serve_beside_it(tmp_path: Path, slow_config: Path) -> None:
    """docs/OPERATIONS.md's single-machine recipe, as a user runs it: `ray start --head --num-cpus 2`
    (token auth on, as Ray 2.60 starts it; the whole bundled app must fit in those two CPUs, or it
    never runs), `serve deploy serve_config.local.yaml`, `serve status`; then keys made
    through the admin HTTP API, which the ingress replica reads from `ray start`'s environment,
    are required, used and revoked. Then `moa serve` beside it, which must not join it: it prints
    where to look (metrics, dashboard, `serve status`, tracing), each of which answers, then
    drains on SIGTERM and exits 0."""
    import tempfile

    import yaml

    recipe = yaml.safe_load((Path(__file__).parent.parent / "serve_config.local.yaml").read_text())
    http, dashboard, gcs = free_port(), free_port(), free_port()
    recipe["http_options"]["port"] = http  # a free port
    # And every interface, as serve_config.yaml and KubeRay bind: with no key, requests from
    # beyond loopback must be refused by the app itself (serve deploy runs no exposure check).
    recipe["http_options"]["host"] = "0.0.0.0"
    beyond = non_loopback_address()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(recipe))
    admin = "adm-" + "x7Qp2" * 6
    # A short temp dir of its own: Ray's socket paths must stay short, and this instance's
    # session must not become the one other tests' Ray instance calls "latest".
    ray_tmp = tempfile.mkdtemp(prefix="moa-ray-", dir="/tmp")
    env = clean_env(
        RAY_AUTH_MODE="token",
        RAY_TMPDIR=ray_tmp,
        MOA_ADMIN_KEY=admin,
        MOA_STATE_DIR=str(tmp_path / "state"),
        # No load balancer in front of this instance to deregister its ingress: `serve shutdown`
        # at the end need not wait out Serve's 30 s draining period (nothing here reads it).
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0",
    )
    head = subprocess.Popen(
        [
            _ray_cli("ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(gcs),
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(free_port()),
            "--include-dashboard",
            "true",
        ],
        env=env,
        stdout=(tmp_path / "ray.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    url = f"http://127.0.0.1:{http}"

    def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_ray_cli("serve"), *args, "-a", address], env=env, capture_output=True, text=True, timeout=120
        )

    try:

        def deployed() -> subprocess.CompletedProcess[str] | None:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited: {(tmp_path / 'ray.out').read_text()[-3000:]}")
            out = serve_cli("deploy", str(config))
            return out if out.returncode == 0 else None

        wait_until_sync(deployed, bool, within_s=START_S, interval=2, what="serve deploy to be accepted")

        def status() -> str:
            return serve_cli("status").stdout

        text = wait_until_sync(
            status, lambda s: "status: RUNNING" in s, within_s=START_S, interval=2, what="the app RUNNING"
        )
        for name in ("ingress", "health-board", "provider-openai", "provider-anthropic", "provider-gemini"):
            assert name in text
        health = httpx.get(url + "/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text

        # No key yet: open over loopback, 503 from beyond it (Serve's proxy passes the scope of
        # its own connection to the replica). The admin API creates a key; from then on keys
        # are required, and one works from anywhere without a restart.
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200
        remote = f"http://{beyond}:{http}" if beyond else None
        if remote is not None:
            refused = httpx.get(remote + "/v1/models", timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "no_api_key", refused.text
        headers = {"Authorization": f"Bearer {admin}"}
        created = httpx.post(url + "/admin/keys", json={"name": "team-a", "budget_usd": 1}, headers=headers)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        assert key.startswith("sk-")

        def without_key() -> int:
            return httpx.get(url + "/v1/models", timeout=30).status_code

        # The ingress replica caches "no keys exist" briefly (state.key_cache_s).
        wait_until_sync(without_key, lambda s: s == 401, within_s=30, interval=0.2, what="keys required")
        chat = {"model": "single", "messages": QUESTION, "max_tokens": 16}
        ok = httpx.post(
            url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert ok.status_code == 200, ok.text
        if remote is not None:
            mine = {"Authorization": f"Bearer {key}"}
            assert httpx.get(remote + "/v1/models", headers=mine, timeout=30).status_code == 200
        listed = httpx.get(url + "/admin/keys", headers=headers).json()
        (row,) = [k for k in listed["data"] if k["name"] == "team-a"]
        assert row["spent_usd"] > 0 and key not in json.dumps(listed)

        assert httpx.post(url + "/admin/keys/team-a/revoke", headers=headers).status_code == 200

        def with_revoked_key() -> int:
            return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

        wait_until_sync(with_revoked_key, lambda s: s == 401, within_s=30, interval=0.2, what="revoked")

        # docs/OPERATIONS.md: `moa serve` never joins a Ray instance already running, even one
        # `ray start` left.
        # In this environment a plain ray.init() would find this one (the address file `ray start`
        # wrote); `moa serve` must start its own, and stopping it must leave this Serve app running.
        found = subprocess.run(
            [
                sys.executable,
                "-c",
                "from ray._private.utils import read_ray_address; print(read_ray_address())",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert found.stdout.strip().endswith(f":{gcs}"), found
        # And `moa serve` itself, as its banner says (the same run: one Ray instance fewer to start
        # in the suite): where to look (metrics, the dashboard and the `serve status` that reaches
        # it, tracing), then SIGTERM's drain.
        metrics = free_port()
        beside = start_serve(
            tmp_path,
            "--config",
            str(slow_config),
            "--metrics-port",
            str(metrics),
            "--dashboard",
            # And with HAProxy in front (docs/OPERATIONS.md): a client that leaves still cancels
            # its calls, and the drain below holds through it.
            "--haproxy",
            port=free_port(),
            # Ray exports metrics every 10 s by default: every 2 s, the request is counted sooner.
            # HAProxy's stats page, its exporter and the fallback proxy on free ports, not the
            # fixed ones another Ray instance on the machine may hold.
            env=clean_env(
                RAY_AUTH_MODE="token",
                RAY_TMPDIR=ray_tmp,
                MOA_STATE_DIR=str(tmp_path / "beside"),
                RAY_metrics_report_interval_ms="2000",
                RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
                RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
            ),
        )
        try:
            beside.wait_ready()
            assert httpx.get(beside.url + "/healthz", timeout=30).status_code == 200
            apps = yaml.safe_load(status())["applications"]  # only the recipe's app, still running
            assert list(apps) == ["moa"] and apps["moa"]["status"] == "RUNNING", apps
            banner = beside.stdout()
            assert "on a local Ray instance" in banner
            assert "HAProxy in front of the ingress (Ray's, splicing off" in banner
            assert "answers are synthetic" in banner  # no key: the simulator deployment serves
            # The metrics endpoint it names answers, with the service's series once a request ran.
            assert f"http://127.0.0.1:{metrics}/metrics" in banner
            assert "Tracing: not exported" in banner
            (its_dashboard,) = re.findall(r"Ray dashboard: (http://\S+)", banner)
            # Ray 2.60 starts a local instance with token auth on; the CLI sends the token it
            # wrote when told to, as the command printed does.
            assert f"  RAY_AUTH_MODE=token serve status --address {its_dashboard}\n" in banner
            its_status = subprocess.run(
                [_ray_cli("serve"), "status", "--address", its_dashboard],
                env=clean_env(RAY_AUTH_MODE="token", RAY_TMPDIR=ray_tmp),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert its_status.returncode == 0 and "provider-openai" in its_status.stdout, its_status
            r = httpx.post(
                beside.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": QUESTION}
            )
            assert r.status_code == 200, r.text

            def scrape() -> str:
                return httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text

            wait_until_sync(
                scrape,
                lambda text: "ray_moa_requests_total{" in text and 'preset="openai/gpt-4o-mini"' in text,
                within_s=120,
                interval=1,
                what="the request counted on the metrics port",
            )
            leave_after_two_writes(beside)
            try:
                short, long = asyncio.run(drain_scenario(beside, signal.SIGTERM))
            except Exception as e:  # what `moa serve` said is what tells why
                raise AssertionError(f"{e!r}\n{beside.tail()}") from e
            assert_drained(short, long)
            assert beside.proc.wait(START_S) == 0, beside.tail()
            assert "1 request(s) still running were ended" in beside.stdout()
            assert "failed to shut down" not in beside.stderr()
            # Nothing that reads as trouble from Serve's logger on a clean run (QuietServe).
            said = beside.stdout() + beside.stderr()
            assert "Connecting to existing Serve app" not in said and "SharedRouterLongPollClient" not in said
            assert "killed by `ray.kill`" not in said  # the stop's own kills (QuietStop)
        finally:
            stop_if_running(beside)
        assert "status: RUNNING" in status()
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
        assert serve_cli("shutdown", "-y").returncode == 0
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def simulator_of(served: Served) -> str:
    """The simulator deployment of a `moa serve` with no key, by its admin API: a port its replica
    listens on (Serve names the process ``ServeReplica:moa:simulator``) among that `moa serve`'s
    processes, the one that answers ``/admin/stats``."""
    import psutil

    for proc in psutil.Process(served.proc.pid).children(recursive=True):
        try:
            if not any("ServeReplica:moa:simulator" in part for part in proc.cmdline()):
                continue
            listening = [c.laddr for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        for ip, port in listening:
            # A wildcard address is reached through loopback; an IPv6 one is written in brackets.
            host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(ip, f"[{ip}]" if ":" in ip else ip)
            try:
                if httpx.get(f"http://{host}:{port}/admin/stats", timeout=5).status_code == 200:
                    return f"http://{host}:{port}"
            except httpx.HTTPError:
                pass
    raise AssertionError(f"no simulator replica among moa serve's processes\n{served.tail()}")


def leave_after_two_writes(served: Served) -> None:
    """A client that sends a chat request's head and body in two writes, then leaves while its call
    waits at the provider: the call is cancelled at the simulator. Behind Ray's HAProxy as Ray 2.60
    configures it (``option splice-request``) such a client is never passed on to the ingress and
    the call runs on (docs/BENCHMARKS.md, "Ray's faster ingress paths"); ``moa serve --haproxy``
    runs it with splicing off."""
    from tests.helpers import clear_faults, model_stats, set_fault

    body = json.dumps({"model": "openai/gpt-4.1", "messages": QUESTION}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: moa\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(served.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=simulator_of(served), timeout=10) as sim:
        set_fault(sim, "gpt-4.1", hang={"rate": 1.0})
        before = model_stats(sim, "gpt-4.1")
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # two writes, two segments
            client.sendall(head)
            time.sleep(0.05)  # the scenario, not a wait: the body comes a moment after the head
            client.sendall(body)
            wait_until_sync(
                lambda: model_stats(sim, "gpt-4.1")["requests"],
                lambda n: n == before["requests"] + 1,
                within_s=60,
                what="the call at the simulator",
            )
        # The client has left: the call it was waiting on is let go.
        after = wait_until_sync(
            lambda: model_stats(sim, "gpt-4.1"),
            lambda m: m["in_flight"] == before["in_flight"],
            within_s=30,
            interval=0.2,
            what="the call cancelled once the client left",
        )
        assert after["cancelled"] == before.get("cancelled", 0) + 1, after
        clear_faults(sim, "gpt-4.1")


def test_moa_serve_local_does_not_hold_answers_for_delayed_acks(config: MoAConfig) -> None:
    """The port `moa serve --local` claims names TCP (``claim_port``), so asyncio turns Nagle's
    algorithm off on every connection it accepts: a response written in two pieces (its head, then
    its body) is sent at once, not held until the client's delayed acknowledgement (40 ms at least
    on Linux), which every answer used to wait for. The median of fifteen requests on one
    connection is timed (a connection's first few segments are acknowledged at once, so the
    first answers were quick even then): about 44 ms with Nagle on, under 1 ms without."""
    from moa.service import claim_port
    from tests.helpers import ApiServer, kept_alive_gets

    with claim_port("127.0.0.1", 0) as probe:
        assert probe.proto == socket.IPPROTO_TCP
    with ApiServer(config) as api:
        times = kept_alive_gets(api.url, "/healthz")
    assert sorted(times)[len(times) // 2] < 0.030, [round(1000 * t, 1) for t in times]
