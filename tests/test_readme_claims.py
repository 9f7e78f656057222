"""Documented claims that no other test proved, and the guards that keep ``docs/CLAIMS.md`` true.

``docs/CLAIMS.md`` maps every behavioural statement of README.md and docs/ to the tests that would fail were
it false. The tests here close gaps an audit of that map found; each names the claim it proves.
They run in this process against the session simulator (official SDKs over loopback), the
``moa`` command line, or a real OTLP receiver; none asserts on a wall clock.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from moa.caps import check_messages, check_plan, worst_case_calls
from moa.config import MoAConfig, ModelPrice, load_config, parse_config
from moa.deadline import Deadline
from moa.engine.engine import MoAEngine
from moa.errors import OverCap
from moa.plan import Plan
from moa.providers.registry import ProviderPool
from moa.providers.retry import retry_delay
from moa.providers.transport import AttemptError
from moa.simulator.profile import ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer
from moa.types import CallRequest, ChatMessage, ErrorKind, GenerationParams
from moa_observability.tracing import tracer
from tests.helpers import ApiServer, by_name, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.test_cli import run_moa
from tests.test_hardening import _config
from tests.test_providers import MODELS, provider_config
from tests.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "docs" / "CLAIMS.md"
QUESTION = (ChatMessage(role="user", content="How do vaccines train the immune system?"),)


# -- the map itself --------------------------------------------------------------------------------


def _test_functions(path: Path) -> set[str]:
    """Every test function a file defines, at module level or in a class (what pytest collects)."""
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_claim_map_cites_exists() -> None:
    """docs/CLAIMS.md cannot go stale silently: a renamed or deleted test it cites fails here."""
    text = CLAIMS.read_text()
    cited = re.findall(r"tests/(\w+\.py)::(\w+)", text)
    assert len(cited) > 150, "the map cites far fewer tests than it should: was it truncated?"
    defined: dict[str, set[str]] = {}
    missing = []
    for file, name in cited:
        path = ROOT / "tests" / file
        if file not in defined:
            defined[file] = _test_functions(path) if path.exists() else set()
        if name not in defined[file]:
            missing.append(f"tests/{file}::{name}")
    assert not missing, f"docs/CLAIMS.md cites tests that do not exist: {sorted(set(missing))}"
    # The summary's counts are the rows' own: a row added without updating them fails too.
    statuses = re.findall(r"^\|[^\n]*\| (proven|weak|unproven|n/a) \|[^\n]*\|$", text, flags=re.M)
    summary = dict(re.findall(r"^- (proven|weak|unproven|n/a): (\d+)$", text, flags=re.M))
    counted = {s: str(statuses.count(s)) for s in ("proven", "weak", "unproven", "n/a")}
    assert summary == counted, (summary, counted)


def _headings(path: Path) -> set[str]:
    """The titles of a markdown file's headings, code blocks left out (a shell comment is none)."""
    titles, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#+ (.+)$", line)):
            titles.add(m.group(1).strip())
    return titles


def test_every_claim_group_names_a_file_and_a_section_it_has() -> None:
    """A claim follows its sentence: each group of docs/CLAIMS.md is ``## FILE: SECTION``, a file
    of the repository and a heading of that file, and each weak claim listed in the summary names
    its group. Mutation caught: a section moved to another page, or renamed, with the map left
    pointing at the old place."""
    text = CLAIMS.read_text()
    groups = re.findall(r"^## ((?:README\.md|docs/[\w.-]+\.md)): (.+)$", text, flags=re.M)
    headed = re.findall(r"^## (?!Summary$)(.+)$", text, flags=re.M)
    assert len(groups) == len(headed) > 10, "a group heading does not name a file: " + str(headed)
    for file, section in groups:
        path = ROOT / file
        assert path.exists(), f"docs/CLAIMS.md names {file}, which does not exist"
        assert section in _headings(path), f"{file} has no section {section!r}"
    names = [f"{file}: {section}" for file, section in groups]
    weak = text.split("### Weak", 1)[1].split("\n### ", 1)[0]
    listed = re.findall(r"^- (.+)$", weak, flags=re.M)
    assert listed, "the summary lists no weak claim"
    strays = [w for w in listed if not any(w.startswith(n + ": ") for n in names)]
    assert not strays, f"weak claims naming no group: {strays}"


def test_the_readmes_layout_table_matches_the_tree() -> None:
    """README "Project layout": every path the table names exists (under the row's folder, or
    from the repository's root), and the ``moa/`` row names every module and subpackage of
    ``moa/``. Mutation caught: a module moved or added without the table following it."""
    section = (ROOT / "README.md").read_text().split("\n## Project layout\n", 1)[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8, rows
    absent, core = [], ""
    for row in rows:
        first, what = row.split(" | ", 1)
        named = re.findall(r"`([^`]+)`", re.sub(r"\(`\w+`\)", "", first))  # not the import names
        folder = ROOT / named[0]
        absent += [n for n in named if not (ROOT / n).exists()]
        if named[0] == "moa/":
            core = what
        for token in re.findall(r"`([\w./-]+(?:\.py|\.md|\.json|\.yaml|\.toml|/))`", what):
            here = folder if folder.is_dir() else ROOT
            found = (here / token).exists() or (ROOT / token).exists() or any(here.rglob(token.rstrip("/")))
            if not found:
                absent.append(f"{named[0]}: {token}")
    assert not absent, f"the layout table names what the tree does not have: {absent}"
    modules = [
        p.name + ("/" if p.is_dir() else "")
        for p in (ROOT / "moa").iterdir()
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    ]
    unnamed = sorted(m for m in modules if f"`{m}`" not in core)
    assert not unnamed, f"the moa/ row of the layout table does not name {unnamed}"


# -- Caps: the defaults, at their boundaries -------------------------------------------------------


def _plan(layers: int, proposers: int, aggregators: int = 1, fallbacks: int = 0) -> Plan:
    ref = {"provider": "openai", "model": "gpt-4.1-mini"}
    return Plan.model_validate(
        {
            "layers": [{"proposers": [ref] * proposers, "quorum": 1}] * layers,
            "aggregators": [ref] * aggregators,
            "fallbacks": [ref] * fallbacks,
        }
    )


def _over_cap(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except OverCap as e:
        return str(e)
    return None


def test_default_caps_hold_at_their_boundaries() -> None:
    """docs/API.md "Caps": the defaults are 4 layers, 8 proposers a layer, 32 calls, 32768 tokens a call,
    512 messages and 400000 characters: the value itself passes, one more is refused."""
    caps = load_config(None).caps
    params = GenerationParams()
    at, over = _plan(4, 7, aggregators=2, fallbacks=2), _plan(5, 1)
    assert worst_case_calls(at) == 32
    assert _over_cap(check_plan, caps, at, params) is None
    assert "caps.max_layers" in str(_over_cap(check_plan, caps, over, params))
    assert _over_cap(check_plan, caps, _plan(1, 8), params) is None
    assert "caps.max_proposers_per_layer" in str(_over_cap(check_plan, caps, _plan(1, 9), params))
    assert "caps.max_calls" in str(_over_cap(check_plan, caps, _plan(4, 7, 2, 3), params))
    assert _over_cap(check_plan, caps, _plan(1, 1), GenerationParams(max_tokens=32768)) is None
    refused = _over_cap(check_plan, caps, _plan(1, 1), GenerationParams(max_tokens=32769))
    assert "caps.max_tokens_per_call" in str(refused)
    hi = ChatMessage(role="user", content="hi")
    assert _over_cap(check_messages, caps, [hi] * 512) is None
    assert "caps.max_messages" in str(_over_cap(check_messages, caps, [hi] * 513))
    assert _over_cap(check_messages, caps, [ChatMessage(role="user", content="x" * 400_000)]) is None
    long = [ChatMessage(role="user", content="x" * 400_001)]
    assert "caps.max_input_chars" in str(_over_cap(check_messages, caps, long))


def test_the_built_in_presets_make_at_most_eleven_calls_and_models_default_to_32768_tokens() -> None:
    """docs/API.md "Caps": the built-in presets make at most 11 calls (``refine``), and a model's
    ``max_output_tokens`` defaults to 32768."""
    cfg = load_config(None)
    worst = {name: worst_case_calls(plan) for name, plan in cfg.presets.items()}
    assert max(worst.values()) == 11 and worst["refine"] == 11, worst
    assert ModelPrice().max_output_tokens == 32768


# -- Configuration: the retry loop -----------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


async def test_connection_failures_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/CONFIGURATION.md: the retry loop retries connection failures (as it does 429 and 5xx)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-connection-refused")
    raw = {
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{_closed_port()}/v1",
                "timeout_s": 30,
                "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
                "models": {"gpt-4.1-mini": {}},
            }
        },
        "simulator": {"mode": "off"},
    }
    async with ProviderPool.from_config(parse_config(raw)) as pool:
        res = await pool.call(CallRequest(provider="openai", model="gpt-4.1-mini", messages=QUESTION))
    assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR, res.error
    assert "connection failed" in res.error.message and res.attempts == 3


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so a connect hangs
    (as to a host that does not answer) until the client's connect timeout."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers = []
        try:
            for _ in range(4):  # more than the queue holds: never accepted
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            yield port
        finally:
            for s in fillers:
                s.close()


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_connect_timeout_s_ends_a_connect_that_hangs(
    unaccepting_port: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/CONFIGURATION.md: ``connect_timeout_s`` bounds connecting, apart from ``timeout_s``.
    With a 60 s call deadline and a 0.2 s connect timeout, every attempt's connect times out and
    is retried: all three attempts are made. Without it the first connect would hang until the
    call's deadline (one attempt)."""
    monkeypatch.setenv("HANGING_API_KEY", "sk-test-connect-timeout")
    base = f"http://127.0.0.1:{unaccepting_port}" + ("/v1" if kind == "openai" else "")
    raw = {
        "providers": {
            "hanging": {
                "kind": kind,
                "api_key_env": "HANGING_API_KEY",
                "base_url": base,
                "timeout_s": 60,
                "connect_timeout_s": 0.2,
                "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
                "models": {"m": {}},
            }
        },
        "simulator": {"mode": "off"},
    }
    async with ProviderPool.from_config(parse_config(raw)) as pool:
        res = await pool.call(CallRequest(provider="hanging", model="m", messages=QUESTION))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT, res.error
    assert res.attempts == 3, res


async def test_backoff_is_jittered_and_exponential(sim: SimulatorServer) -> None:
    """docs/CONFIGURATION.md: retries wait a jittered exponential backoff: uniform in
    [0, min(backoff_max_s, backoff_base_s * 2**(attempt-1))], never the same wait twice."""
    cfg = provider_config(sim.url, retry={"max_attempts": 10, "backoff_base_s": 0.1, "backoff_max_s": 1.0})
    async with ProviderPool.from_config(cfg, sim_url=sim.url) as pool:
        client = pool.clients["openai"]
        err = AttemptError(ErrorKind.SERVER_ERROR, "500: simulated")
        far = Deadline.after(3600)
        for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (8, 1.0)]:
            delays = [retry_delay(client.cfg.retry, err, attempt, far, emitted=False) for _ in range(200)]
            assert all(d is not None and 0 <= d <= cap for d in delays), (attempt, max(map(float, delays)))
            assert max(float(d) for d in delays if d is not None) > cap / 2  # the whole range is used
            assert len(set(delays)) == len(delays)  # jittered: no two waits alike
        # A wait that would end past the call's deadline is not taken: the call fails now instead.
        assert retry_delay(client.cfg.retry, err, 5, Deadline.after(0), emitted=False) is None


async def test_an_internal_failure_is_logged_with_its_type(
    sim: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/CONFIGURATION.md: ``internal`` (raised on our side) is logged with its type."""
    bad = (ChatMessage(role="user", content="\ud800 hello"),)
    async with ProviderPool.from_config(provider_config(sim.url), sim_url=sim.url) as pool:
        with caplog.at_level(logging.ERROR, logger="moa.providers"):
            res = await pool.call(CallRequest(provider="openai", model=MODELS["openai"], messages=bad))
    assert res.error is not None and res.error.kind is ErrorKind.INTERNAL
    logged = [r for r in caplog.records if getattr(r, "event", None) == "internal_error"]
    assert logged and getattr(logged[0], "error_type", None) == "UnicodeEncodeError", [
        (r.getMessage(), getattr(r, "error_type", None)) for r in logged
    ]
    assert "UnicodeEncodeError" in logged[0].getMessage()


# -- Configuration: adjustments on the span --------------------------------------------------------


async def test_adjustments_are_on_the_provider_span(otlp: OTLPReceiver, sim: SimulatorServer) -> None:
    """docs/CONFIGURATION.md: every parameter change is in the ``moa.adjustments`` span attribute
    (as well as the call record and the log line, which test_providers asserts)."""
    async with ProviderPool.from_config(provider_config(sim.url), sim_url=sim.url) as pool:
        with tracer().start_as_current_span("client request") as root:
            res = await pool.call(
                CallRequest(
                    provider="anthropic",
                    model=MODELS["anthropic"],
                    messages=QUESTION,
                    params=GenerationParams(temperature=1.5),
                )
            )
    assert res.ok, res.error
    trace_id = format(root.get_span_context().trace_id, "032x")
    (span,) = by_name(
        wait_for_spans(otlp, trace_id, {f"chat {MODELS['anthropic']}"}), f"chat {MODELS['anthropic']}"
    )
    assert span["attributes"]["moa.adjustments"] == res.adjustments
    # The provider-reported service time rides on the same span (from the simulator's header here).
    assert res.provider_service_s is not None
    assert span["attributes"]["moa.provider_service_s"] == res.provider_service_s
    assert res.adjustments == ["temperature 1.5 clamped to 1.0 (Anthropic's range is 0-1)"]


# -- Presets and modes: the LLM classifier's fallback ----------------------------------------------


async def test_the_llm_classifier_falls_back_to_the_heuristic(
    config: MoAConfig, sim: SimulatorServer
) -> None:
    """docs/CONFIGURATION.md "Routing (auto)": ``router.classifier: llm`` falls back to the heuristic when the
    cheap model fails; the request is still answered, and nothing is cached."""
    router = config.router.model_dump() | {
        "classifier": "llm",
        "classifier_model": {"provider": "openai", "model": "gpt-4o-mini"},
    }
    cfg = config.model_copy(update={"router": type(config.router).model_validate(router)})
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        (await admin.put("/admin/faults/gpt-4o-mini", json={"error_500": {"rate": 1.0}})).raise_for_status()
    async with ProviderPool.from_config(cfg, sim_url=sim.url) as pool:
        engine = MoAEngine(cfg, pool)
        result = await engine.run(list(QUESTION), preset="auto")
        again = await engine.run(list(QUESTION), preset="auto")
    reason = result.decision.reason
    assert "heuristic score" in reason and "llm classifier: server_error" in reason, reason
    assert result.text and not result.decision.classifier_cached
    assert not again.decision.classifier_cached  # a failed classification is not cached


# -- moa ask's generation options -----------------------------------------------------------------


def test_ask_sends_its_system_max_tokens_and_temperature(sim: SimulatorServer, tmp_path: Path) -> None:
    """docs/API.md "Ask a question in-process": ``--system``, ``--max-tokens`` and ``--temperature``
    reach the model's API: the simulator records each request's parameters, and the system text
    shows in the prompt tokens the API counted."""
    path = tmp_path / "moa.yaml"
    path.write_text(
        "providers:\n  o: {kind: openai, models: {gpt-4o-mini: {}}}\n"
        f"simulator: {{mode: on, url: '{sim.url}'}}\n"
    )
    ask = ("ask", "Hi", "--preset", "o/gpt-4o-mini", "--no-stream", "--json", "--config", str(path))
    plain = run_moa(*ask)
    assert plain.returncode == 0, plain.stderr
    system = "Answer like a pirate who has read every book on sailing ships. " * 5
    out = run_moa(*ask, "--system", system, "--max-tokens", "17", "--temperature", "0.25")
    assert out.returncode == 0, out.stderr
    first, seen = httpx.get(f"{sim.url}/admin/requests").json()["requests"]
    assert first["params"] == {}, first
    assert seen["params"]["max_tokens"] == 17 and seen["params"]["temperature"] == 0.25, seen
    tokens = [json.loads(o.stdout)["calls"][0]["usage"]["input_tokens"] for o in (plain, out)]
    assert tokens[1] > tokens[0] + 40, tokens  # the system message was sent with the question


# -- The provider simulator: jitter ----------------------------------------------------------------


async def test_the_simulator_jitters_its_latency_within_the_profiles_bounds(sim: SimulatorServer) -> None:
    """docs/SIMULATOR.md: latency per model has jitter. With ``jitter: j`` each of
    time to first token and generation time is scaled by a factor in [1-j, 1+j]; the service time
    the simulator reports for the same request differs from one answer to the next."""
    ttft, tps, j = 0.02, 4000.0, 0.5
    profile = SimProfile(default=ModelProfile(ttft_s=ttft, tokens_per_s=tps, jitter=j))
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        reset = await admin.post("/admin/reset", json={"profile": profile.model_dump(mode="json")})
        reset.raise_for_status()
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sim", max_retries=0)
    times = []
    async with client:
        for _ in range(8):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4.1-mini", messages=[{"role": "user", "content": "Name a colour."}]
            )
            tokens = raw.parse().usage.completion_tokens  # type: ignore[union-attr]
            nominal = ttft + tokens / tps
            t = float(raw.headers["x-simulator-service-ms"]) / 1000
            assert (1 - j) * nominal - 1e-3 <= t <= (1 + j) * nominal + 1e-3, (t, nominal)
            times.append(t)
    assert len(set(times)) > 1, times  # the same request, different latencies


# -- Observability: the OTLP variables ------------------------------------------------------------

_EMIT = """
from moa_observability.tracing import flush_tracing, setup_tracing, tracer
assert setup_tracing()
with tracer().start_as_current_span("readme-otlp-probe"):
    pass
flush_tracing()
"""


def _tracing_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return base | extra


def test_otlp_traces_endpoint_headers_and_default_service_name() -> None:
    """docs/OBSERVABILITY.md: export is configured by the standard variables:
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` alone is enough, ``OTEL_EXPORTER_OTLP_HEADERS`` go
    with every export, and ``service.name`` is ``moa`` unless ``OTEL_SERVICE_NAME`` says otherwise.
    Without the gRPC exporter installed, ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` is refused by name."""
    receiver = OTLPReceiver().start()
    try:
        env = _tracing_env(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{receiver.url}/v1/traces",
            OTEL_EXPORTER_OTLP_HEADERS="x-readme-probe=claims",
        )
        out = subprocess.run(
            [sys.executable, "-c", _EMIT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        spans = wait_until_sync(
            lambda: [s for s in receiver.spans if s["name"] == "readme-otlp-probe"],
            bool,
            what="the probe span at the receiver",
        )
        assert spans[0]["resource"]["service.name"] == "moa"
        assert receiver.headers and all(h.get("x-readme-probe") == "claims" for h in receiver.headers)
    finally:
        receiver.stop()
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401

        have_grpc = True
    except ImportError:
        have_grpc = False
    if not have_grpc:
        env = _tracing_env(
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
        )
        out = subprocess.run(
            [sys.executable, "-c", _EMIT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode != 0 and "opentelemetry-exporter-otlp-proto-grpc" in out.stderr


# -- Errors: a client hanging up -------------------------------------------------------------------


def test_a_client_hanging_up_marks_the_server_span_499(otlp: OTLPReceiver, sim: SimulatorServer) -> None:
    """docs/API.md "Streaming": a client that disconnects is logged (test_hardening) "and its span
    marked" with status 499, not as a server error."""
    httpx.put(f"{sim.url}/admin/faults/*", json={"hang": {"rate": 1.0}}).raise_for_status()
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    body = {"model": "moa-lite", "messages": [{"role": "user", "content": QUESTION[0].content}]}
    with ApiServer(_config(sim)) as server:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: the hang-up under test
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=0.3)
        name = "POST /v1/chat/completions"
        spans = wait_until_sync(
            lambda: by_name(wait_for_spans(otlp, trace_id, {name}), name),
            lambda found: found and "http.response.status_code" in found[0]["attributes"],
            what="the server span, ended",
        )
    (span,) = spans
    assert span["attributes"]["http.response.status_code"] == 499, span["attributes"]
    assert span["status"] != 2  # STATUS_CODE_ERROR: a hang-up is no server error


# -- Install: what the extras add ------------------------------------------------------------------


def test_the_serve_extra_adds_ray_serve_and_opentelemetry_is_in_the_core() -> None:
    """README and docs/OPERATIONS.md "Install and test": ``pip install -e .`` is the core without
    Ray; ``[serve]`` adds Ray Serve; OpenTelemetry (API, SDK, OTLP/HTTP exporter) is a core
    dependency."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [re.split(r"[<>=!\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert not [d for d in core if d.startswith("ray")], core
    for package in ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"):
        assert package in core, (package, core)
    assert [d.split(">")[0] for d in project["optional-dependencies"]["serve"]] == ["ray[serve]"]


# -- Configuration and `moa serve --local`: defaults and refusals ----------------------------------


def test_the_server_defaults_are_the_documented_ones() -> None:
    """docs/CONFIGURATION.md: ``server: {open: false, max_request_bytes: 1000000,
    max_concurrent_requests: 256, key_concurrency_share: 0.5, request_deadline_s: 120, drain_s: 20,
    header_timeout_s: 10, keep_alive_s: 5, sse_keepalive_s: 5}`` in the bundled config and the
    model."""
    documented = {
        "open": False,
        "header_timeout_s": 10,
        "keep_alive_s": 5,
        "max_request_bytes": 1_000_000,
        "max_concurrent_requests": 256,
        "key_concurrency_share": 0.5,
        "request_deadline_s": 120,
        "drain_s": 20,
        "sse_keepalive_s": 5,
    }
    for server in (load_config(None).server, type(load_config(None).server)()):
        assert {k: getattr(server, k) for k in documented} == documented


def test_serve_local_refuses_the_flags_that_need_ray(tmp_path: Path) -> None:
    """docs/OPERATIONS.md "moa serve --local": ``--num-cpus``, ``--metrics-port``, ``--dashboard`` and
    ``--haproxy`` are Ray's and are refused (before anything listens)."""
    for flag in (["--num-cpus", "1"], ["--metrics-port", "9999"], ["--dashboard"], ["--haproxy"]):
        out = run_moa("serve", "--local", "--port", "1", *flag, env={"MOA_STATE_DIR": str(tmp_path)})
        assert out.returncode == 2, (flag, out.stderr)
        assert "--dashboard, --metrics-port, --num-cpus and --haproxy need Ray" in out.stderr, out.stderr


# -- Presets and modes: staircase without a stream; trimming to the context window ------------------


async def test_a_plain_request_runs_staircase_as_final(config: MoAConfig) -> None:
    """docs/CONFIGURATION.md "Aggregation modes": staircase is for streaming requests; a plain
    request runs it as ``final`` (no step calls; every answer of the layer reaches the aggregator)."""
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        engine = MoAEngine(config, pool)
        result = await engine.run(list(QUESTION), preset="moa-lite", aggregation="staircase")
    aggregators = [c for c in result.calls if c.stage.value == "aggregator"]
    assert len(aggregators) == 1 and aggregators[0].staircase_step is None, aggregators
    assert not [c for c in result.calls if c.staircase_step is not None]
    assert result.text.startswith("Synthesis of 3 references")


async def test_the_staircase_steps_are_marked_on_their_fuse_spans(
    otlp: OTLPReceiver, config: MoAConfig
) -> None:
    """docs/CONFIGURATION.md "Aggregation modes": each staircase step is a ``moa.fuse`` span with
    ``moa.stage`` and ``moa.staircase_step``: in ``moa``, the aggregator's and the second layer's
    proposers'."""
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        engine = MoAEngine(config, pool)
        with tracer().start_as_current_span("client request") as root:
            async for ev in engine.stream(list(QUESTION), preset="moa", aggregation="staircase"):
                result = ev
    steps = sorted(
        (c.stage.value, c.staircase_step) for c in getattr(result, "calls", []) if c.staircase_step
    )
    assert {stage for stage, _ in steps} == {"aggregator", "proposer"}, steps
    trace_id = format(root.get_span_context().trace_id, "032x")

    def marked(found: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return sorted(
            (s["attributes"]["moa.stage"], s["attributes"]["moa.staircase_step"])
            for s in found
            if s["attributes"].get("moa.staircase_step")
        )

    spans = wait_until_sync(
        lambda: by_name(wait_for_spans(otlp, trace_id, {"moa.fuse"}), "moa.fuse"),
        lambda found: (
            len(marked(found)) == len(steps)
            and any(
                s["attributes"]["moa.stage"] == "aggregator"
                for s in found
                if not s["attributes"]["moa.staircase_step"]
            )
        ),
        what="a fuse span per step and the aggregator's last",
    )
    assert marked(spans) == steps


async def test_references_are_trimmed_to_the_models_context_window(config: MoAConfig) -> None:
    """docs/CONFIGURATION.md "Token budget": without ``reference_budget_tokens`` the references are trimmed to
    the aggregator model's context window (what is left of it after the answer and the prompt)."""
    plan = config.presets["moa-lite"]
    agg = plan.aggregators[0]
    raw = config.model_dump(mode="json")
    raw["providers"][agg.provider]["models"][agg.model]["context_window"] = 700
    small = parse_config(raw)
    params = GenerationParams(max_tokens=400)
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        roomy = await MoAEngine(config, pool).run(list(QUESTION), plan=plan, params=params)
        tight = await MoAEngine(small, pool).run(list(QUESTION), plan=plan, params=params)
    assert plan.reference_budget_tokens is None
    assert not any("trimmed" in n for n in roomy.notes), roomy.notes
    assert any("trimmed" in n for n in tight.notes), tight.notes
    assert "[...]" in tight.text and "[...]" not in roomy.text  # the aggregator saw them cut


# -- Observability: span attributes ----------------------------------------------------------------


async def test_the_documented_span_attributes(
    otlp: OTLPReceiver, config: MoAConfig, sim: SimulatorServer
) -> None:
    """docs/OBSERVABILITY.md: ``moa.run`` carries the preset, router reason, aggregation, cost,
    tokens and fallback; ``moa.route`` complexity, task, reason and substitutions; ``moa.layer``
    index, quorum, succeeded and stragglers cancelled; provider spans the requested temperature
    and max tokens, and ``error.type`` when the call failed."""
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        fault = {"error_500": {"rate": 1.0}}
        (await admin.put("/admin/faults/gemini-2.5-flash", json=fault)).raise_for_status()
    params = GenerationParams(temperature=0.3, max_tokens=200)
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        engine = MoAEngine(config, pool)
        with tracer().start_as_current_span("client request") as root:
            routed = await engine.run(list(QUESTION), preset="auto")
        with tracer().start_as_current_span("client request") as root2:
            result = await engine.run(list(QUESTION), preset="moa-lite", params=params)
    trace_id = format(root.get_span_context().trace_id, "032x")
    (route,) = by_name(wait_for_spans(otlp, trace_id, {"moa.route", "moa.run"}), "moa.route")
    r = route["attributes"]
    assert r["moa.router.complexity"] == routed.decision.complexity.value  # type: ignore[union-attr]
    assert r["moa.router.complexity"] in {"simple", "medium", "complex"}
    assert r["moa.router.task"] == (routed.decision.task.value if routed.decision.task else "")
    assert r["moa.router.reason"] == routed.decision.reason and r["moa.router.substitutions"] == 0
    trace_id = format(root2.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "moa.layer", "chat gemini-2.5-flash", "moa.fuse"})
    (run,) = by_name(spans, "moa.run")
    a = run["attributes"]
    assert a["moa.preset"] == "moa-lite" and a["moa.router.reason"] == result.decision.reason
    assert a["moa.aggregation"] == "final" and a["moa.fallback"] == ""
    assert a["moa.cost_usd"] == pytest.approx(result.cost_usd) and a["moa.calls"] == len(result.calls)
    assert a["gen_ai.usage.input_tokens"] == result.usage.input_tokens
    (layer,) = by_name(spans, "moa.layer")
    la = layer["attributes"]
    assert (la["moa.layer.index"], la["moa.layer.quorum"], la["moa.layer.succeeded"]) == (1, 2, 2), la
    assert la["moa.layer.stragglers_cancelled"] == 0
    (failed,) = by_name(spans, "chat gemini-2.5-flash")
    assert failed["attributes"]["error.type"] == "server_error"
    ok = by_name(spans, "chat gpt-4.1-mini")[0]["attributes"]
    assert ok["gen_ai.request.temperature"] == 0.3 and ok["gen_ai.request.max_tokens"] == 200
    assert "error.type" not in ok


# -- HTTP API: /v1/moa's result; the cache off by default; an error event through the SDK ----------


def _sim_requests(sim: SimulatorServer) -> int:
    return sum(m["requests"] for m in httpx.get(f"{sim.url}/admin/stats").json()["models"].values())


def test_v1_moa_returns_the_full_result_and_the_cache_is_off_by_default(sim: SimulatorServer) -> None:
    """docs/API.md "Endpoints": ``/v1/moa`` with a ``preset`` returns the text, the plan, the decision,
    every call (layer, provider, model, role, latency, tokens, cost, error kind, straggler flag)
    and the totals (tokens, cost, wall time, critical path). docs/CACHING.md: off until
    the config enables it, so the same request twice is answered twice by the models."""
    body = {"messages": [{"role": "user", "content": QUESTION[0].content}], "preset": "moa-lite"}
    with ApiServer(_config(sim)) as server:
        first = httpx.post(f"{server.url}/v1/moa", json=body, timeout=60)
        after_first = _sim_requests(sim)
        again = httpx.post(f"{server.url}/v1/moa", json=body, timeout=60)
    assert first.status_code == again.status_code == 200, first.text
    r = first.json()
    assert r["text"].startswith("Synthesis of 3 references") and r["preset"] == "moa-lite"
    assert [len(layer["proposers"]) for layer in r["plan"]["layers"]] == [3]
    assert r["decision"]["preset"] == "moa-lite" and r["decision"]["reason"]
    assert len(r["calls"]) == 4
    for call in r["calls"]:
        for field in ("layer", "provider", "model", "role", "latency_s", "usage", "cost_usd", "error_kind"):
            assert field in call, (field, call)
        assert call["cancelled_straggler"] is False
    assert r["usage"]["input_tokens"] == sum(c["usage"]["input_tokens"] for c in r["calls"])
    assert r["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in r["calls"]))
    assert r["wall_time_s"] >= r["critical_path_s"] > 0
    # No cache configured: the repeat went to the models again, and the header says it bypassed.
    assert after_first == 4 and _sim_requests(sim) == 8
    assert first.headers["x-moa-cache"] == again.headers["x-moa-cache"] == "bypass"


def test_the_openai_sdk_raises_the_error_event_while_iterating(sim: SimulatorServer) -> None:
    """docs/API.md "Streaming": a failure after the headers ends the stream with an error event, which
    the OpenAI SDK raises as an ``APIError`` while iterating."""
    import openai

    for model in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1", "gemini-2.5-pro"):
        httpx.put(f"{sim.url}/admin/faults/{model}", json={"error_500": {"rate": 1.0}}).raise_for_status()
    with ApiServer(_config(sim)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="moa-lite", messages=[{"role": "user", "content": QUESTION[0].content}], stream=True
        )
        with pytest.raises(openai.APIError) as raised:
            for _ in stream:
                pass
    assert isinstance(raised.value.body, dict), raised.value.body
    assert raised.value.body["code"] == "all_providers_failed", raised.value.body


# -- Configuration: what counts against a provider's circuit breaker -------------------------------


@pytest.mark.parametrize(
    ("fault", "kind", "counts"),
    [
        ({"error_429": {"rate": 1.0, "retry_after_s": 0.01}}, ErrorKind.RATE_LIMITED, True),
        ({"malformed_json": {"rate": 1.0}}, ErrorKind.MALFORMED_RESPONSE, True),
        ({"error_500": {"rate": 1.0}}, ErrorKind.SERVER_ERROR, True),
        (None, ErrorKind.AUTH, False),  # a key the API refuses: ours to fix, not the provider's
    ],
    ids=["rate_limited", "malformed_response", "server_error", "auth"],
)
async def test_only_what_the_provider_did_counts_against_its_breaker(
    sim: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    fault: dict[str, Any] | None,
    kind: ErrorKind,
    counts: bool,
) -> None:
    """docs/CONFIGURATION.md: ``rate_limited``, ``server_error`` and ``malformed_response`` count
    against the provider's circuit breaker (threshold 3 here: three failed calls open it); an
    ``auth`` failure does not, however often it happens."""
    model = MODELS["openai"]
    breaker = {"failure_threshold": 3, "cooldown_s": 600}
    retry = {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
    if fault is None:
        # Real-API mode at the simulator's address with a key it refuses, as OpenAI would.
        monkeypatch.setenv("REFUSED_API_KEY", "sim-invalid-key-readme-claims")
        openai_cfg = {"kind": "openai", "api_key_env": "REFUSED_API_KEY", "base_url": f"{sim.url}/v1"}
        raw = {
            "providers": {
                "openai": {**openai_cfg, "circuit_breaker": breaker, "retry": retry, "models": {model: {}}}
            },
            "simulator": {"mode": "off"},
        }
        cfg, sim_url = parse_config(raw), None
    else:
        cfg, sim_url = provider_config(sim.url, circuit_breaker=breaker, retry=retry), sim.url
        async with httpx.AsyncClient(base_url=sim.url) as admin:
            (await admin.put(f"/admin/faults/{model}", json=fault)).raise_for_status()
    async with ProviderPool.from_config(cfg, sim_url=sim_url) as pool:
        client = pool.clients["openai"]
        for _ in range(3 if counts else 6):
            res = await client.complete(CallRequest(provider="openai", model=model, messages=QUESTION))
            assert res.error is not None and res.error.kind is kind, res.error
        assert client.health()["state"] == ("open" if counts else "closed")


# -- Presets: single's fallback chain; moa ask's table ---------------------------------------------


async def test_single_falls_back_along_the_other_providers(config: MoAConfig, sim: SimulatorServer) -> None:
    """docs/CONFIGURATION.md "Presets and modes": ``single`` is one model with the other providers as its
    fallback chain: its model failing, the next provider's answers."""
    first, second = (a.model for a in config.presets["single"].aggregators[:2])
    async with httpx.AsyncClient(base_url=sim.url) as admin:
        (await admin.put(f"/admin/faults/{first}", json={"error_500": {"rate": 1.0}})).raise_for_status()
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        result = await MoAEngine(config, pool).run(list(QUESTION), preset="single")
    assert [(c.model, c.ok) for c in result.calls] == [(first, False), (second, True)], result.calls
    assert result.model == second and result.text


def test_ask_prints_a_table_of_every_call_with_the_documented_columns(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """docs/API.md "Ask a question in-process": after the answer, a table of every call (stage, layer,
    model, role, latency, tokens, cost, status) and the totals."""
    path = tmp_path / "moa.yaml"
    raw = load_config(None).model_dump(mode="json", exclude={"simulator"})
    raw["simulator"] = {"mode": "on", "url": sim.url}
    path.write_text(json.dumps(raw))
    out = run_moa(
        "ask", "How do vaccines work?", "--preset", "moa-lite", "--no-stream", "--config", str(path)
    )
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stderr.splitlines() if "stage" in line and "status" in line)
    for column in ("stage", "layer", "model", "role", "latency", "tokens in/out", "cost $", "status"):
        assert column in header, (column, header)
    rows = [line for line in out.stderr.splitlines() if "gpt-4.1-mini" in line or "claude-haiku-4-5" in line]
    assert rows and all("proposer" in row for row in rows), out.stderr
    assert "total: 4 calls" in out.stderr
