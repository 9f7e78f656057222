"""Traces, logs and metrics, received for real: spans arrive at an OTLP/HTTP receiver on loopback
from this process and from every Ray worker; metrics are scraped from Ray's Prometheus endpoint."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from moa.config import MoAConfig, parse_config
from moa.engine.engine import MoAEngine
from moa.providers.registry import ProviderPool
from moa.simulator.server import SimulatorServer
from moa.types import ChatMessage
from moa_observability.tracing import tracer
from tests.helpers import by_name, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.waiting import wait_until_sync

QUESTION_TEXT = "How do vaccines train the immune system?"
QUESTION = [ChatMessage(role="user", content=QUESTION_TEXT)]
SECRET = "sk-live-THIS-MUST-NEVER-LEAK-0123456789"


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def real_mode_config(sim: SimulatorServer, capture: bool) -> MoAConfig:
    """Real-API mode (a key in the environment) with the provider's base_url on the simulator."""
    return parse_config(
        {
            "providers": {
                "openai": {
                    "kind": "openai",
                    "api_key_env": "OPENAI_API_KEY",
                    "base_url": sim.url + "/v1",
                    "models": {"gpt-4.1-mini": {}, "gpt-4.1": {}},
                }
            },
            "simulator": {"mode": "off"},
            "presets": {
                "duo": {
                    "layers": [
                        {
                            "proposers": [
                                {"provider": "openai", "model": "gpt-4.1-mini"},
                                {
                                    "provider": "openai",
                                    "model": "gpt-4.1-mini",
                                    "temperature": 1.0,
                                    "role": "critical",
                                },
                            ]
                        }
                    ],
                    "aggregators": [{"provider": "openai", "model": "gpt-4.1"}],
                }
            },
            "observability": {"capture_content": capture},
        }
    )


@pytest.fixture
async def real_mode_engine(sim: SimulatorServer, request: pytest.FixtureRequest) -> AsyncIterator[MoAEngine]:
    cfg = real_mode_config(sim, capture=request.param)
    async with ProviderPool.from_config(cfg, env={"OPENAI_API_KEY": SECRET}) as pool:
        yield MoAEngine(cfg, pool)


@pytest.mark.parametrize("real_mode_engine", [False], indirect=True)
async def test_in_process_trace_tree(
    otlp: OTLPReceiver, real_mode_engine: MoAEngine, log_lines: io.StringIO
) -> None:
    with tracer().start_as_current_span("client request") as root:
        result = await real_mode_engine.run(QUESTION, preset="duo")
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "moa.route", "moa.layer", "moa.fuse", "chat gpt-4.1"})
    ids = {s["span_id"]: s for s in spans}
    (run,) = by_name(spans, "moa.run")
    (layer,) = by_name(spans, "moa.layer")
    (fuse,) = by_name(spans, "moa.fuse")
    proposals = by_name(spans, "chat gpt-4.1-mini")
    (final,) = by_name(spans, "chat gpt-4.1")
    assert ids[run["parent_id"]]["name"] == "client request"
    assert by_name(spans, "moa.route")[0]["parent_id"] == run["span_id"]
    assert layer["parent_id"] == fuse["parent_id"] == run["span_id"]
    assert len(proposals) == 2 and all(p["parent_id"] == layer["span_id"] for p in proposals)
    assert overlap(*proposals), "proposers run in parallel"
    assert sorted(str(p["attributes"].get("moa.role")) for p in proposals) == ["None", "critical"]
    assert final["parent_id"] == fuse["span_id"]
    # GenAI semantic conventions on a provider span.
    a = final["attributes"]
    assert final["kind"] == 3  # SPAN_KIND_CLIENT
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4.1" and a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] == result.calls[-1].usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] > 0 and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["server.address"] == "127.0.0.1" and a["server.port"] > 0
    assert layer["attributes"]["moa.layer.quorum"] == 2 and run["attributes"]["moa.preset"] == "duo"
    # Content capture is off: neither the prompt nor the answer is recorded; the key never is.
    dump = json.dumps(spans)
    assert QUESTION_TEXT not in dump and result.text[:40] not in dump and SECRET not in dump
    # Every provider call logged a JSON line with the trace id, and no line holds the key.
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    calls = [line for line in lines if line.get("event") == "provider_call"]
    assert len(calls) == 3 and all(line["trace_id"] == trace_id and line["span_id"] for line in calls)
    assert SECRET not in log_lines.getvalue()


@pytest.mark.parametrize("real_mode_engine", [True], indirect=True)
async def test_content_capture_is_opt_in_and_keys_never_appear(
    otlp: OTLPReceiver, real_mode_engine: MoAEngine, log_lines: io.StringIO
) -> None:
    with tracer().start_as_current_span("client request") as root:
        await real_mode_engine.run(QUESTION, preset="duo")
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"chat gpt-4.1"})
    (final,) = by_name(spans, "chat gpt-4.1")
    assert QUESTION_TEXT in final["attributes"]["gen_ai.input.messages"]
    assert "Synthesis of 2 references" in final["attributes"]["gen_ai.output.messages"]
    assert SECRET not in json.dumps(spans) and SECRET not in log_lines.getvalue()


async def test_a_failed_calls_own_message_reaches_its_log_line_and_span_redacted(
    otlp: OTLPReceiver, sim: SimulatorServer, log_lines: io.StringIO
) -> None:
    """The provider's reason, not only its kind, is in the "provider call" log line and on the
    call's span status: with every part of the key the provider echoed (OpenAI's mask) removed."""
    key = "sim-invalid-key-" + "Z9" * 12
    cfg = parse_config(
        {
            "providers": {
                "openai": {
                    "kind": "openai",
                    "api_key_env": "OPENAI_API_KEY",
                    "base_url": sim.url + "/v1",
                    "models": {"gpt-4.1-mini": {}},
                }
            },
            "simulator": {"mode": "off"},
        }
    )
    async with ProviderPool.from_config(cfg, env={"OPENAI_API_KEY": key}) as pool:
        with (
            tracer().start_as_current_span("client request") as root,
            pytest.raises(Exception, match="Incorrect API key provided"),
        ):
            await MoAEngine(cfg, pool).run(QUESTION, preset="openai/gpt-4.1-mini")
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (logged,) = [line for line in lines if line.get("event") == "provider_call"]
    assert logged["error_kind"] == "auth" and "Incorrect API key provided" in logged["error_message"]
    trace_id = format(root.get_span_context().trace_id, "032x")
    (call,) = by_name(wait_for_spans(otlp, trace_id, {"chat gpt-4.1-mini"}), "chat gpt-4.1-mini")
    assert call["status_message"].startswith("auth: ") and "Incorrect API key" in call["status_message"]
    for fragment in (key, key[:8], key[-4:]):
        assert fragment not in log_lines.getvalue() and fragment not in call["status_message"]


@pytest.mark.parametrize("stream", [False, True], ids=["call", "stream"])
async def test_one_genai_span_per_model_call(otlp: OTLPReceiver, sim: SimulatorServer, stream: bool) -> None:
    """The Anthropic SDK opens its own ``anthropic.messages.create`` span with GenAI attributes:
    beside ours, every Anthropic call would count twice in GenAI views. One span per call."""
    cfg = parse_config(
        {
            "providers": {
                "anthropic": {
                    "kind": "anthropic",
                    "api_key_env": "ANTHROPIC_API_KEY",
                    "base_url": sim.url,
                    "models": {"claude-haiku-4-5": {}},
                }
            },
            "simulator": {"mode": "off"},
        }
    )
    async with ProviderPool.from_config(cfg, env={"ANTHROPIC_API_KEY": SECRET}) as pool:
        engine = MoAEngine(cfg, pool)
        with tracer().start_as_current_span("client request") as root:
            if stream:
                async for _ in engine.stream(QUESTION, preset="anthropic/claude-haiku-4-5"):
                    pass
            else:
                await engine.run(QUESTION, preset="anthropic/claude-haiku-4-5")
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "chat claude-haiku-4-5"})
    genai = [s for s in spans if "gen_ai.operation.name" in s["attributes"]]
    assert [s["name"] for s in genai] == ["chat claude-haiku-4-5"], [s["name"] for s in spans]
    assert genai[0]["attributes"]["gen_ai.provider.name"] == "anthropic"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_http_request_trace_tree_in_one_process(otlp: OTLPReceiver, config: MoAConfig, stream: bool) -> None:
    """Through the HTTP API (moa serve --local): the README's tree, moa.route under moa.run."""
    from tests.helpers import ApiServer

    body = {"model": "moa-lite", "messages": [{"role": "user", "content": QUESTION_TEXT}], "stream": stream}
    with ApiServer(config) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-moa-trace-id"]
    names = {"POST /v1/chat/completions", "moa.run", "moa.route", "moa.layer", "moa.fuse", "chat gpt-4.1"}
    spans = wait_for_spans(otlp, trace_id, names)
    (server_span,) = by_name(spans, "POST /v1/chat/completions")
    (run,) = by_name(spans, "moa.run")
    assert run["parent_id"] == server_span["span_id"]
    for child in ("moa.route", "moa.layer", "moa.fuse"):
        (span,) = by_name(spans, child)
        assert span["parent_id"] == run["span_id"], child


def test_tracing_off_costs_nothing_visible(sim: SimulatorServer) -> None:
    """Without an SDK provider the API hands out non-recording spans (checked in a clean process)."""
    import subprocess
    import sys

    code = (
        "from moa_observability.tracing import setup_tracing, tracer\n"
        "assert setup_tracing() is False\n"
        "s = tracer().start_span('x')\n"
        "assert not s.is_recording()\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- across the Ray fan-out -----------------------------------------------------------------------


def test_one_trace_across_processes_and_nodes(
    cluster: dict[str, Any], url: str, otlp: OTLPReceiver, sim: SimulatorServer
) -> None:
    # Each proposer takes half a second, so their spans overlap even when a busy machine is slow
    # to dispatch the fan-out: the overlap shows the calls ran in parallel, not how fast.
    for model in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash"):
        httpx.put(f"{sim.url}/admin/faults/{model}", json={"hang": {"hang_s": 0.5}}).raise_for_status()
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "moa-lite", "messages": [{"role": "user", "content": QUESTION_TEXT}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-moa-trace-id"]
    expected = {"POST /v1/chat/completions", "moa.run", "moa.route", "moa.layer", "moa.fuse", "chat gpt-4.1"}
    spans = wait_for_spans(otlp, trace_id, expected | {"chat gemini-2.5-flash", "chat claude-haiku-4-5"})
    names = {s["name"] for s in spans}
    assert expected <= names, names
    ids = {s["span_id"]: s for s in spans}
    (server,) = by_name(spans, "POST /v1/chat/completions")
    assert server["parent_id"] is None and server["attributes"]["http.response.status_code"] == 200
    (run,) = by_name(spans, "moa.run")
    (layer,) = by_name(spans, "moa.layer")
    (fuse,) = by_name(spans, "moa.fuse")
    assert run["parent_id"] == server["span_id"] and layer["parent_id"] == run["span_id"]
    assert by_name(spans, "moa.route")[0]["parent_id"] == run["span_id"]
    proposals = [s for s in spans if s["name"].startswith("chat ") and s["parent_id"] == layer["span_id"]]
    assert {s["attributes"]["gen_ai.provider.name"] for s in proposals} == {
        "openai",
        "anthropic",
        "gcp.gemini",
    }
    assert all(overlap(a, b) for a in proposals for b in proposals if a is not b), "parallel fan-out"
    (final,) = by_name(spans, "chat gpt-4.1")
    assert final["parent_id"] == fuse["span_id"]
    # The spans come from different processes (deployments) and nodes, all in one trace.
    deployments = {s["resource"].get("ray.serve.deployment") for s in spans}
    assert {"ingress", "provider-openai", "provider-anthropic", "provider-gemini"} <= deployments
    worker = cluster["worker_node"]
    assert {s["resource"]["ray.node_id"] for s in proposals} == {worker}
    assert server["resource"]["ray.node_id"] != worker
    assert all(s["resource"]["service.name"] == "moa" for s in spans)
    assert all(ids.get(s["parent_id"]) is not None for s in spans if s is not server), "no orphan spans"


def test_one_trace_per_streaming_request(url: str, otlp: OTLPReceiver) -> None:
    """A stream's spans close after the response has started: they still form one tree, with the
    aggregator's streamed call under the fusion and no second trace."""
    body = {"model": "moa-lite", "messages": [{"role": "user", "content": QUESTION_TEXT}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        trace_id = r.headers["x-moa-trace-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    expected = {"POST /v1/chat/completions", "moa.run", "moa.layer", "moa.fuse", "chat gpt-4.1"}
    spans = wait_for_spans(otlp, trace_id, expected)
    ids = {s["span_id"]: s for s in spans}
    (server,) = by_name(spans, "POST /v1/chat/completions")
    (run,) = by_name(spans, "moa.run")
    (fuse,) = by_name(spans, "moa.fuse")
    (final,) = by_name(spans, "chat gpt-4.1")
    assert server["parent_id"] is None and run["parent_id"] == server["span_id"]
    assert final["parent_id"] == fuse["span_id"] and final["attributes"]["gen_ai.request.stream"] is True
    assert all(ids.get(s["parent_id"]) is not None for s in spans if s is not server), "no orphan spans"
    assert len(by_name(spans, "chat gpt-4.1-mini")) == 1  # each proposer once, in this one trace


def test_client_traceparent_is_continued(url: str, otlp: OTLPReceiver) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"model": "single", "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["x-moa-trace-id"] == trace_id
    spans = wait_for_spans(otlp, trace_id, {"POST /v1/chat/completions", "chat gpt-4.1-mini"})
    servers = by_name(spans, "POST /v1/chat/completions")
    assert len(servers) == 1, json.dumps(
        [(s["resource"], s["attributes"], s["kind"]) for s in servers], indent=1
    )
    (server,) = servers
    assert server["parent_id"] == "00f067aa0ba902b7"
    assert by_name(spans, "chat gpt-4.1-mini")


def test_metrics_on_the_prometheus_endpoint(cluster: dict[str, Any], url: str) -> None:
    body = {"model": "moa-lite", "messages": [{"role": "user", "content": "Hi there"}]}
    for _ in range(3):
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200

    def series(text: str) -> dict[str, bool]:
        lines = text.splitlines()
        return {
            "gemini duration": any(
                line.startswith("ray_gen_ai_client_operation_duration_bucket")
                and 'gen_ai_provider_name="gcp.gemini"' in line
                and 'gen_ai_request_model="gemini-2.5-flash"' in line
                for line in lines
            ),
            "output tokens": any(
                line.startswith("ray_gen_ai_client_token_usage_bucket")
                and 'gen_ai_token_type="output"' in line
                for line in lines
            ),
            "requests by preset": any(
                line.startswith("ray_moa_requests") and 'preset="moa-lite"' in line for line in lines
            ),
        }

    text = ""

    def scrape() -> dict[str, bool]:
        nonlocal text
        text = "\n".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            for port in cluster["metrics"].values()
        )
        return series(text)

    # Ray's metrics agents export on their own period: wait until the series appear.
    wait_until_sync(scrape, lambda found: all(found.values()), within_s=60, interval=1, what="the series")
    assert "sk-" not in text


def _series_value(text: str, name: str, **tags: str) -> float:
    """The sum of a Prometheus series' samples whose labels include ``tags``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in labels for k, v in tags.items()):
            total += float(value)
    return total
