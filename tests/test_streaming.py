"""Streaming time to first byte: headers and the role chunk as soon as a request is admitted,
keep-alive comments while the proposers work, progress for clients that ask, aggregation modes,
and an aggregator stream that breaks mid-answer continued on the next aggregator.

The API runs in-process (``moa serve --local``'s server on loopback) against the session
simulator, driven over HTTP with httpx for the raw bytes and with the official openai SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from moa.config import MoAConfig, SimulatorMode, load_config
from moa.engine.engine import MoAEngine
from moa.plan import Plan
from moa.providers.registry import ProviderPool
from moa.result import MoAResult
from moa.simulator.server import SimulatorServer
from moa.types import TextDelta
from moa_observability.tracing import tracer
from tests.helpers import QUESTION, ApiServer, by_name, set_fault, sim_stats, wait_for_spans
from tests.otlp_receiver import OTLPReceiver

# moa-lite's proposers; its aggregators are gpt-4.1, then claude-sonnet-4-6.
PROPOSERS = ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash")
SLOW_PROPOSER_S = 2.0
KEEPALIVE_S = 0.3


def slow_proposers(sim: SimulatorServer, ttft_s: float = SLOW_PROPOSER_S) -> None:
    """Proposers that take ``ttft_s`` to answer; everything else stays fast."""
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    profile["models"] = {m: {"ttft_s": ttft_s, "tokens_per_s": 2000.0, "jitter": 0.0} for m in PROPOSERS}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()


def _config(sim: SimulatorServer) -> MoAConfig:
    cfg = load_config(None)
    return cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "server": cfg.server.model_copy(update={"sse_keepalive_s": KEEPALIVE_S}),
        }
    )


@pytest.fixture
def api_url(sim: SimulatorServer) -> Iterator[str]:
    with ApiServer(_config(sim)) as server:
        yield server.url


@pytest.fixture
def client(api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def sse_lines(api_url: str, body: dict[str, Any]) -> tuple[int, list[tuple[float, str]]]:
    """The response's status and every SSE line with the time it arrived (s after the request)."""
    status, lines, _ = sse_lines_probed(api_url, body, lambda: None)
    return status, lines


def sse_lines_probed(
    api_url: str, body: dict[str, Any], probe: Callable[[], Any]
) -> tuple[int, list[tuple[float, str]], tuple[Any, Any]]:
    """``sse_lines``, plus what ``probe()`` returned when the headers arrived and when the first
    data line did: the state of the world at those moments (an ordering, where a time would be a
    clock bound)."""
    lines: list[tuple[float, str]] = []
    at_headers = at_first_data = None
    seen_data = False
    t0 = time.monotonic()
    with httpx.stream("POST", api_url + "/v1/chat/completions", json=body, timeout=60) as r:
        at_headers = probe()
        lines.append((time.monotonic() - t0, f"status {r.status_code}"))
        for line in r.iter_lines():
            if line.startswith("data: ") and not seen_data:
                at_first_data, seen_data = probe(), True
            if line:
                lines.append((time.monotonic() - t0, line))
        return r.status_code, lines, (at_headers, at_first_data)


def streamed_answer(api_url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A streamed request that must succeed: its text and its ``moa.detail``."""
    status, lines = sse_lines(api_url, body)
    assert status == 200
    events = data_events(lines)
    assert not any(isinstance(e, dict) and "error" in e for _, e in events), events
    text = content_of(events)
    return text, next(e["moa"] for _, e in events if isinstance(e, dict) and "moa" in e)


def proposers_answered(sim: SimulatorServer) -> dict[str, int]:
    """How many calls each proposer model has answered (completed) so far."""
    stats = sim_stats(sim)
    return {m: int(stats.get(m, {}).get("completed", 0)) for m in PROPOSERS}


def data_events(lines: list[tuple[float, str]]) -> list[tuple[float, Any]]:
    out = []
    for t, line in lines:
        if line.startswith("data: "):
            raw = line[len("data: ") :]
            out.append((t, raw if raw == "[DONE]" else json.loads(raw)))
    return out


def content_of(events: list[tuple[float, Any]]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for _, e in events
        if isinstance(e, dict) and e.get("choices")
    )


def test_headers_and_role_chunk_arrive_long_before_the_answer(api_url: str, sim: SimulatorServer) -> None:
    slow_proposers(sim)
    before = proposers_answered(sim)
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True}
    status, lines, (at_headers, at_role) = sse_lines_probed(api_url, body, lambda: proposers_answered(sim))
    assert status == 200
    events = data_events(lines)
    role_at, role = events[0]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [
        t
        for t, e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    ]
    first_text_at = texts[0]
    # Headers and the role chunk came before any proposer had answered (an ordering, not a clock);
    # the first text only after the slow proposers' time to first token.
    assert at_headers == before and at_role == before, (before, at_role)
    assert proposers_answered(sim) != before  # ...and the proposers did answer afterwards
    assert first_text_at >= SLOW_PROPOSER_S, first_text_at
    # While the proposers work, comment lines keep the connection busy, every KEEPALIVE_S or so.
    comments = [(t, line) for t, line in lines if line.startswith(":")]
    waiting = [t for t, _ in comments if role_at < t < first_text_at]
    assert len(waiting) >= SLOW_PROPOSER_S / KEEPALIVE_S / 2, comments
    assert any("proposers done" in line for _, line in comments), comments
    assert events[-1][1] == "[DONE]"
    assert content_of(events).startswith("Synthesis of 3 references")


def test_the_openai_sdk_parses_keepalives_and_progress(client: openai.OpenAI, sim: SimulatorServer) -> None:
    slow_proposers(sim, 1.0)
    stream = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        extra_body={"moa": {"progress": True}},
    )
    text, progress = "", []
    for chunk in stream:
        if not chunk.choices:
            extra = chunk.model_extra or {}
            progress.append(extra["moa"]["progress"])
            continue
        text += chunk.choices[0].delta.content or ""
    assert text.startswith("Synthesis of 3 references")
    stages = [p["stage"] for p in progress]
    assert stages[0] == "admitted" and stages[-1] == "aggregating", stages
    layer = [p for p in progress if p["stage"] == "proposers"]
    assert [p["proposers_done"] for p in layer] == sorted(p["proposers_done"] for p in layer)
    assert layer[0]["proposers_done"] == 0 and layer[-1]["proposers_done"] >= 2
    # moa-lite: one layer of three proposers with a quorum of two.
    assert all(
        p["layer"] == 1 and p["layers"] == 1 and p["proposers"] == 3 and p["quorum"] == 2 for p in layer
    )


def test_without_progress_no_choiceless_chunks(client: openai.OpenAI, sim: SimulatorServer) -> None:
    slow_proposers(sim, 1.0)
    chunks = list(client.chat.completions.create(model="moa-lite", messages=QUESTION, stream=True))  # type: ignore[arg-type]
    assert chunks and all(c.choices for c in chunks)


def test_admission_errors_are_still_plain_http_errors(api_url: str) -> None:
    for body, status in (
        ({"model": "no-such-preset", "messages": QUESTION, "stream": True}, 404),
        ({"model": "moa-lite", "messages": QUESTION, "stream": True, "moa": {"aggregation": "late"}}, 422),
    ):
        r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in r.json()


def test_a_failure_after_the_headers_ends_with_an_error_event(api_url: str, sim: SimulatorServer) -> None:
    for model in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1", "gemini-2.5-pro"):
        set_fault(sim, model, error_500={"rate": 1.0})
    status, lines = sse_lines(api_url, {"model": "moa-lite", "messages": QUESTION, "stream": True})
    assert status == 200  # the headers went out at admission
    events = data_events(lines)
    assert events[0][1]["choices"][0]["delta"]["role"] == "assistant"
    error = events[-2][1]
    assert error["error"]["type"] and error["error"]["code"] == "all_providers_failed", error
    assert events[-1][1] == "[DONE]"


def test_a_cut_aggregator_stream_is_continued_on_the_next(api_url: str, sim: SimulatorServer) -> None:
    # moa-lite's first aggregator (gpt-4.1) breaks half-way through its stream; the second
    # (claude-sonnet-4-6, Anthropic: assistant prefill) continues from where the text stopped.
    set_fault(sim, "gpt-4.1", cut_stream={"rate": 1.0, "first_n": 1})
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True, "moa": {"detail": True}}
    text, detail = streamed_answer(api_url, body)
    aggregators = [c for c in detail["calls"] if c["stage"] == "aggregator"]
    cut, cont = aggregators
    assert cut["model"] == "gpt-4.1" and not cut["ok"]
    assert cont["model"] == "claude-sonnet-4-6" and cont["ok"]
    assert 0 < cont["continued_after_chars"] < len(text)
    assert detail["totals"]["aggregator_switches"] == 1
    assert detail["answered_by"] == "anthropic/claude-sonnet-4-6"
    assert any("continued the answer" in n for n in detail["notes"]), detail["notes"]
    # One answer, not a restart: it opens once; the second model was handed exactly the text out
    # (as an Anthropic prefill, without its trailing whitespace, which the API refuses).
    assert text.startswith("Synthesis of 3 references") and text.count("Synthesis of") == 1
    joint = cont["continued_after_chars"]
    seen = httpx.get(f"{sim.url}/admin/requests").json()["requests"]
    handed = [r["continues"] for r in seen if r["model"] == "claude-sonnet-4-6" and r["continues"]]
    assert handed == [text[:joint].rstrip()]


def _two_layer_plan(config: MoAConfig, aggregation: str) -> Plan:
    raw = config.presets["moa"].model_dump(mode="json")
    raw["grace_s"] = 3.0
    raw["aggregation"] = aggregation
    return Plan.model_validate(raw)


@pytest.mark.parametrize("mode", ["final", "early"])
def test_aggregation_modes_on_a_two_layer_plan(api_url: str, sim: SimulatorServer, mode: str) -> None:
    # One proposer of each layer is 1 s slower than the others, well within the 3 s grace:
    # final waits for it (3 references at every step), early moves on at the quorum (2).
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    slow = {"ttft_s": 1.0, "tokens_per_s": 2000.0, "jitter": 0.0}
    profile["models"] = {"gemini-2.5-pro": slow, "gemini-2.5-flash": slow}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()
    body = {"model": "moa", "messages": QUESTION, "moa": {"detail": True, "aggregation": mode}}
    t0 = time.monotonic()
    r = httpx.post(api_url + "/v1/chat/completions", json=body, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    detail = r.json()["moa"]
    text = r.json()["choices"][0]["message"]["content"]
    assert detail["aggregation"] == mode
    proposers = [c for c in detail["calls"] if c["stage"] == "proposer"]
    assert len(proposers) == 6
    stragglers = [c for c in proposers if c["cancelled_straggler"]]
    if mode == "final":
        assert not stragglers and text.startswith("Synthesis of 3 references")
        assert elapsed >= 2.0  # waited for the slow proposer in both layers
    else:
        assert {c["model"] for c in stragglers} == {"gemini-2.5-pro", "gemini-2.5-flash"}
        assert all(c["error_kind"] == "cancelled" for c in stragglers)
        # Moving on is shown by the cancelled stragglers above, not by a clock.
        assert text.startswith("Synthesis of 2 references")
    # The plan's own mode, on /v1/moa, gives the same.
    cfg = load_config(None)
    plan = _two_layer_plan(cfg, mode)
    r = httpx.post(
        api_url + "/v1/moa",
        json={"messages": QUESTION, "plan": plan.model_dump(mode="json")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["aggregation"] == mode
    assert r.json()["text"].startswith("Synthesis of 3" if mode == "final" else "Synthesis of 2")


@pytest.fixture
async def engine(config: MoAConfig) -> Any:
    async with ProviderPool.from_config(config, sim_url=config.simulator.url) as pool:
        yield MoAEngine(config, pool)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Anthropic continues an assistant prefill; OpenAI and Gemini get a continue instruction.
        ({"provider": "openai", "model": "gpt-4.1"}, {"provider": "anthropic", "model": "claude-sonnet-4-6"}),
        ({"provider": "anthropic", "model": "claude-sonnet-4-6"}, {"provider": "openai", "model": "gpt-4.1"}),
        ({"provider": "openai", "model": "gpt-4.1"}, {"provider": "gemini", "model": "gemini-2.5-pro"}),
    ],
)
async def test_engine_continues_on_every_wire(
    engine: MoAEngine, config: MoAConfig, sim: SimulatorServer, first: dict[str, str], second: dict[str, str]
) -> None:
    raw = config.presets["moa-lite"].model_dump(mode="json")
    raw["aggregators"] = [first, second]
    plan = Plan.model_validate(raw)
    set_fault(sim, first["model"], cut_stream={"rate": 1.0, "first_n": 1})
    deltas: list[str] = []
    result: MoAResult | None = None
    async for ev in engine.stream([m for m in _messages()], plan=plan):
        if isinstance(ev, TextDelta):
            deltas.append(ev.text)
        elif isinstance(ev, MoAResult):
            result = ev
    assert result is not None
    text = "".join(deltas)
    assert text == result.text and result.model == second["model"]
    cont = result.calls[-1]
    assert cont.continued_after_chars is not None and 0 < cont.continued_after_chars < len(text)
    assert text.count("Synthesis of") == 1
    # What the second model received: the first one's text, as a prefill (Anthropic, without
    # trailing whitespace) or as an assistant turn before a continue instruction (the others).
    async with httpx.AsyncClient() as admin:
        seen = (await admin.get(f"{sim.url}/admin/requests")).json()["requests"]
    handed = [r["continues"] for r in seen if r["model"] == second["model"] and r["continues"]]
    sent = text[: cont.continued_after_chars]
    assert handed == [sent.rstrip() if second["provider"] == "anthropic" else sent]


def _messages() -> list[Any]:
    from moa.types import ChatMessage

    return [ChatMessage(role="user", content=QUESTION[0]["content"])]


async def test_the_trace_records_the_mode_and_the_switch(
    otlp: OTLPReceiver, engine: MoAEngine, sim: SimulatorServer
) -> None:
    set_fault(sim, "gpt-4.1", cut_stream={"rate": 1.0, "first_n": 1})
    with tracer().start_as_current_span("client request") as root:
        async for _ in engine.stream(_messages(), preset="moa-lite", aggregation="early"):
            pass
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = wait_for_spans(otlp, trace_id, {"moa.run", "moa.fuse"})
    (run,) = by_name(spans, "moa.run")
    (fuse,) = by_name(spans, "moa.fuse")
    assert run["attributes"]["moa.aggregation"] == "early"
    assert fuse["attributes"]["moa.fuse.continued"] is True
    assert fuse["attributes"]["moa.fuse.continued_by"] == "anthropic/claude-sonnet-4-6"
    assert fuse["attributes"]["moa.fuse.continued_after_chars"] > 0
    assert fuse["attributes"]["moa.answered_by"] == "anthropic/claude-sonnet-4-6"


def test_the_simulator_continues_a_prefix_as_the_real_apis_do(sim: SimulatorServer) -> None:
    import anthropic

    claude = anthropic.Anthropic(base_url=sim.url, api_key="sim-key", max_retries=0)
    ask = [{"role": "user", "content": "How do vaccines train the immune system?"}]
    full = "".join(
        b.text
        for b in claude.messages.create(model="claude-haiku-4-5", max_tokens=800, messages=ask).content  # type: ignore[arg-type]
        if b.type == "text"
    )
    head = full[: len(full) // 2].rstrip()
    prefilled = [*ask, {"role": "assistant", "content": head}]
    rest = claude.messages.create(model="claude-haiku-4-5", max_tokens=800, messages=prefilled)  # type: ignore[arg-type]
    # Its own answer: exactly what follows the prefill, and only that.
    assert head + "".join(b.text for b in rest.content if b.type == "text") == full
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=50,
            messages=[*ask, {"role": "assistant", "content": head + " "}],  # type: ignore[list-item]
        )
    # Another model's partial answer, handed over with a continue instruction on the OpenAI wire.
    gpt = openai.OpenAI(base_url=sim.url + "/v1", api_key="sim-key", max_retries=0)
    turns = [
        *ask,
        {"role": "assistant", "content": head + " "},
        {"role": "user", "content": load_config(None).templates.continue_user},
    ]
    more = gpt.chat.completions.create(model="gpt-4.1", messages=turns).choices[0].message.content or ""  # type: ignore[arg-type]
    assert more and not more[0].isspace() and not more.startswith(head[:20])


def test_staircase_answers_while_the_last_layer_still_streams(api_url: str, sim: SimulatorServer) -> None:
    # The second layer's proposers write at 300 tokens a second (a few seconds each); the
    # aggregator is fast. Steps start at each boundary the quorum reached.
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    slow = {"ttft_s": 0.05, "tokens_per_s": 300.0, "jitter": 0.0}
    profile["models"] = {m: slow for m in PROPOSERS}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()
    body = {
        "model": "moa",
        "messages": QUESTION,
        "stream": True,
        "moa": {"detail": True, "aggregation": "staircase"},
    }
    text, detail = streamed_answer(api_url, body)
    assert detail["aggregation"] == "staircase"
    calls = detail["calls"]
    steps = [c for c in calls if c["stage"] == "aggregator" and c["staircase_step"] is not None]
    (last,) = [c for c in calls if c["stage"] == "aggregator" and c["staircase_step"] is None]
    assert [c["staircase_step"] for c in steps] == [1, 2, 3]
    # Layer 2 stepped over layer 1 too: its proposers' steps are calls of their own, all counted.
    stepped = [c for c in calls if c["stage"] == "proposer" and c["staircase_step"] is not None]
    assert all(c["layer"] == 2 for c in stepped)
    assert detail["totals"]["staircase_steps"] == len(steps) + len(stepped)
    assert all(c["ok"] and c["usage"]["output_tokens"] <= 48 for c in steps)
    # The first step started while the last layer's proposers were still writing.
    layer2 = [c for c in calls if c["stage"] == "proposer" and c["layer"] == 2]
    assert steps[0]["started_s"] < max(c["started_s"] + c["latency_s"] for c in layer2)
    # Each step continued the answer the steps before wrote; the last one finished it.
    marks = [c["continued_after_chars"] or 0 for c in [*steps, last]]
    assert marks[0] == 0 and marks == sorted(marks) and marks[-1] < len(text)
    assert last["ok"] and detail["totals"]["aggregator_switches"] == 0
    assert text.startswith("Synthesis of") and text.count("Synthesis of") == 1


def test_staircase_steps_count_in_the_caps_and_the_projected_cost() -> None:
    from moa.caps import worst_case_calls
    from moa.engine.cost import projected_cost
    from moa.types import ChatMessage, GenerationParams

    cfg = load_config(None)
    final = cfg.presets["moa"]
    stair = Plan.model_validate({**final.model_dump(mode="json"), "aggregation": "staircase"})
    # Each step calls the aggregators and, in this two-layer plan, layer 2's proposers once more.
    steps = stair.staircase_steps * (len(stair.aggregators) + len(stair.layers[1].proposers))
    assert worst_case_calls(stair) == worst_case_calls(final) + steps
    ask = [ChatMessage(role="user", content=QUESTION[0]["content"])]
    params = GenerationParams(max_tokens=200)
    assert projected_cost(cfg, stair, ask, params) > projected_cost(cfg, final, ask, params)
