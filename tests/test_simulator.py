"""The provider simulator as the official SDKs see it: answers, streams, usage, errors and faults.

Every test talks HTTP over loopback with the real ``openai``, ``anthropic`` and ``google-genai``
clients (retries off), so what passes here is what production adapters will parse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import anthropic
import httpx
import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from moa.cli import simulator as sim_cli
from moa.simulator.profile import (
    Faults,
    FaultSpec,
    HangFault,
    ModelProfile,
    ProfileError,
    RateFault,
    SimProfile,
    load_profile,
)
from moa.simulator.server import SimulatorServer
from moa.simulator.text import compose, style_for
from moa.tokens import approx_message_tokens, approx_tokens
from tests.conftest import FAST_TOKENS_PER_S
from tests.helpers import set_fault, sim_stats, wait_idle
from tests.waiting import wait_until, wait_until_sync

KEY = "sim-test-key"
QUESTION = "How do vaccines train the immune system?"
MESSAGES: Any = [{"role": "user", "content": QUESTION}]  # Any: the SDKs type messages as TypedDicts


# -- helpers -------------------------------------------------------------------------------------------
# Clients are created once per module (each costs tens of milliseconds of TLS setup, even for plain
# HTTP); the function-scoped fixtures below also request ``sim``, which resets the simulator.


def put_profile(admin: httpx.Client, profile: SimProfile) -> None:
    admin.put("/admin/profile", json=profile.model_dump(mode="json")).raise_for_status()


def post(admin: httpx.Client, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return admin.post(
        path, json=body, headers={"Authorization": f"Bearer {KEY}"} if headers is None else headers
    )


def references(*texts: str) -> str:
    blocks = "\n\n".join(f'<reference id="{i}">\n{t}\n</reference>' for i, t in enumerate(texts, start=1))
    return f"Synthesise these responses.\n\nResponses from models:\n{blocks}"


def gemini_client(url: str, key: str = KEY) -> genai.Client:
    # attempts=1 turns off both tenacity retries and the aiohttp transport's implicit reconnect-retry.
    options = genai_types.HttpOptions(
        base_url=url, api_version="v1beta", retry_options=genai_types.HttpRetryOptions(attempts=1)
    )
    return genai.Client(api_key=key, http_options=options)


@dataclass
class Clients:
    admin: httpx.Client
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    gemini: genai.Client


@pytest.fixture(scope="module")
async def clients(simulator: SimulatorServer) -> AsyncIterator[Clients]:
    c = Clients(
        admin=httpx.Client(base_url=simulator.url),
        openai=openai.AsyncOpenAI(base_url=f"{simulator.url}/v1", api_key=KEY, max_retries=0),
        anthropic=anthropic.AsyncAnthropic(base_url=simulator.url, api_key=KEY, max_retries=0),
        gemini=gemini_client(simulator.url),
    )
    yield c
    await c.openai.close()
    await c.anthropic.close()
    await c.gemini.aio.aclose()
    c.gemini.close()
    c.admin.close()


@pytest.fixture
def admin(sim: SimulatorServer, clients: Clients) -> httpx.Client:
    return clients.admin


@pytest.fixture
def oai(sim: SimulatorServer, clients: Clients) -> openai.AsyncOpenAI:
    return clients.openai


@pytest.fixture
def claude(sim: SimulatorServer, clients: Clients) -> anthropic.AsyncAnthropic:
    return clients.anthropic


@pytest.fixture
def gem(sim: SimulatorServer, clients: Clients) -> genai.Client:
    return clients.gemini


# -- OpenAI --------------------------------------------------------------------------------------------


async def test_openai_chat_completion(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES)
    c = raw.parse()
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion" and c.model == "gpt-4.1"
    assert c.system_fingerprint and c.system_fingerprint.startswith("fp_")
    choice = c.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.refusal is None and choice.logprobs is None
    text = choice.message.content or ""
    assert 60 <= approx_tokens(text) <= 450 and "vaccines" in text.lower()
    assert c.usage is not None
    assert c.usage.completion_tokens == approx_tokens(text)
    assert c.usage.prompt_tokens == approx_message_tokens([QUESTION])
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.usage.prompt_tokens_details and c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.usage.completion_tokens_details and c.usage.completion_tokens_details.reasoning_tokens == 0
    # The service time the simulator spent: ttft (0.02 s) + the prompt read at the default 10,000
    # tokens/s + tokens at the FAST profile's rate, no jitter; in its own header unrounded, and as
    # OpenAI reports it, in whole milliseconds.
    service = float(raw.headers["x-simulator-service-ms"]) / 1000
    expected = 0.02 + c.usage.prompt_tokens / 10_000 + c.usage.completion_tokens / FAST_TOKENS_PER_S
    assert service == pytest.approx(expected, abs=1e-6)
    processing = raw.headers["openai-processing-ms"]
    assert processing.isdigit() and abs(int(processing) - service * 1000) <= 0.5
    assert raw.headers["x-request-id"].startswith("req_") and c._request_id == raw.headers["x-request-id"]


async def test_openai_stream_with_usage_matches_the_plain_answer(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES)
    stream = await oai.chat.completions.create(
        model="gpt-4.1-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert len(chunks) > 5 and chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and plain.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_openai_stream_wire_format_without_usage(admin: httpx.Client) -> None:
    body = {"model": "gpt-4.1", "messages": MESSAGES, "stream": True, "max_tokens": 20}
    with admin.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert int(r.headers["openai-processing-ms"]) >= 20  # a stream reports it too, in its head
        assert float(r.headers["x-simulator-service-ms"]) > 20
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


async def test_max_tokens_truncates_with_length(oai: openai.AsyncOpenAI) -> None:
    for params in ({"max_tokens": 12}, {"max_completion_tokens": 12}):
        c = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, **params)  # type: ignore[call-overload]
        assert c.choices[0].finish_reason == "length"
        assert c.usage is not None and c.usage.completion_tokens == 12
        assert 0 < approx_tokens(c.choices[0].message.content or "") <= 12


async def test_stop_sequences(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    c = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stop=["."])
    assert c.choices[0].finish_reason == "stop" and "." not in (c.choices[0].message.content or "")
    m = await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=500, messages=MESSAGES, stop_sequences=["\n\n"]
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "\n\n"
    assert "\n\n" not in m.content[0].text  # type: ignore[union-attr]


async def test_answers_are_deterministic_and_differ_per_model(oai: openai.AsyncOpenAI) -> None:
    async def ask(model: str, **kw: Any) -> str:
        c = await oai.chat.completions.create(model=model, messages=MESSAGES, **kw)
        return c.choices[0].message.content or ""

    a, again, other_seed, greedy1, greedy2, *models = await asyncio.gather(
        ask("gpt-4.1", seed=7, temperature=0.8),
        ask("gpt-4.1", seed=7, temperature=0.8),
        ask("gpt-4.1", seed=8, temperature=0.8),
        ask("gpt-4.1", seed=1, temperature=0),
        ask("gpt-4.1", seed=2, temperature=0),
        *(ask(m) for m in ("gpt-4.1", "gpt-4.1-mini", "claude-sonnet-4-6", "gemini-2.5-pro")),
    )
    assert a == again
    assert a != other_seed  # sampling varies with the seed...
    assert greedy1 == greedy2  # ...except at temperature 0
    assert len(set(models)) == 4


def test_styles_are_stable_per_model() -> None:
    transcript = (("user", "Why do bridges need expansion joints?"),)
    openers = {
        compose("claude-sonnet-4-6", "thoughtful", transcript, s, None).split("\n")[0] for s in range(12)
    }
    assert openers <= {
        "This is a nuanced topic, so let me walk through it carefully.",
        "There is a simple answer and a more careful one; both are worth having.",
    }
    assert style_for("gpt-4.1") == "structured" and style_for("some-new-model") == style_for("some-new-model")
    structured = compose("gpt-4.1", "structured", transcript, None, None)
    assert "\n- **" in structured and "bridges" in structured.lower()


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    await oai.chat.completions.create(model="my-custom-model", messages=MESSAGES, max_tokens=5)
    ids = [m.id async for m in oai.models.list()]
    assert {"gpt-4.1", "claude-haiku-4-5", "gemini-2.5-flash", "my-custom-model"} <= set(ids)


def test_models_list_in_each_format(admin: httpx.Client) -> None:
    anthropic_list = admin.get("/v1/models", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert anthropic_list.json()["data"][0]["type"] == "model" and anthropic_list.json()["has_more"] is False
    gemini_list = admin.get("/v1beta/models", headers={"x-goog-api-key": KEY}).json()["models"]
    assert any(m["name"] == "models/gemini-2.5-pro" for m in gemini_list)
    assert admin.get("/v1/models").status_code == 401


async def test_classifier_style_prompts_get_short_answers(oai: openai.AsyncOpenAI) -> None:
    prompt = (
        "Classify the user request below. Answer with two words only: its complexity (simple, medium or "
        "complex) and its task type (code, math, creative, analysis or general).\n\nRequest:\nWrite a sort."
    )
    c = await oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    words = (c.choices[0].message.content or "").split()
    assert len(words) == 2
    assert words[0] in {"simple", "medium", "complex"}
    assert words[1] in {"code", "math", "creative", "analysis", "general"}


# -- Anthropic -----------------------------------------------------------------------------------------


async def test_anthropic_message(claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=1000,
        system=[{"type": "text", "text": "You are helpful."}],
        messages=MESSAGES,
    )
    m = await raw.parse()
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == "claude-haiku-4-5" and m.stop_reason == "end_turn" and m.stop_sequence is None
    text = m.content[0].text  # type: ignore[union-attr]
    assert m.usage.output_tokens == approx_tokens(text)
    assert m.usage.input_tokens == approx_message_tokens(["You are helpful.", QUESTION])
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0
    assert m._request_id == raw.headers["request-id"] == raw.headers["x-request-id"]
    # Anthropic reports no service time: only the simulator's own header carries it.
    assert float(raw.headers["x-simulator-service-ms"]) > 20 and "openai-processing-ms" not in raw.headers


async def test_anthropic_stream_event_sequence(claude: anthropic.AsyncAnthropic) -> None:
    plain = await claude.messages.create(model="claude-opus-4-6", max_tokens=1000, messages=MESSAGES)
    stream = await claude.messages.create(
        model="claude-opus-4-6", max_tokens=1000, messages=MESSAGES, stream=True
    )
    events: list[Any] = [e async for e in stream]
    kinds = [e.type for e in events]
    deltas = kinds.count("content_block_delta")
    assert deltas > 5
    assert kinds == [
        "message_start",
        "content_block_start",
        *(["content_block_delta"] * deltas),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK drops the ping event
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == plain.content[0].text  # type: ignore[union-attr]
    delta = events[-2]
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == plain.usage.output_tokens
    start = events[0]
    assert start.type == "message_start" and start.message.usage.input_tokens == plain.usage.input_tokens


def test_anthropic_stream_raw_events_include_ping(admin: httpx.Client) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": MESSAGES, "stream": True}
    r = admin.post("/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    names = re.findall(r"^event: (\w+)$", r.text, re.MULTILINE)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_stream_helper_and_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(model="claude-haiku-4-5", max_tokens=15, messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 15
    assert final.content[0].text == text and approx_tokens(text) <= 15  # type: ignore[union-attr]


def test_anthropic_requires_max_tokens(admin: httpx.Client) -> None:
    r = admin.post(
        "/v1/messages",
        json={"model": "claude-haiku-4-5", "messages": MESSAGES},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


# -- Gemini --------------------------------------------------------------------------------------------


async def test_gemini_generate_content(gem: genai.Client) -> None:
    config = genai_types.GenerateContentConfig(system_instruction="Be concise.", temperature=0.3)
    r = await gem.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION, config=config)
    assert r.text and "vaccines" in r.text.lower()
    cand = r.candidates[0] if r.candidates else None
    assert cand is not None and cand.finish_reason == genai_types.FinishReason.STOP and cand.index == 0
    u = r.usage_metadata
    assert u is not None and u.candidates_token_count == approx_tokens(r.text)
    assert u.prompt_token_count == approx_message_tokens(["Be concise.", QUESTION])
    assert u.total_token_count == u.prompt_token_count + u.candidates_token_count
    assert u.cached_content_token_count is None  # omitted when zero, as the real API does
    assert r.model_version == "gemini-2.5-flash" and r.response_id
    # Gemini reports no service time: only the simulator's own header carries it.
    headers = r.sdk_http_response.headers if r.sdk_http_response else None
    assert headers is not None and "openai-processing-ms" not in headers
    assert float(headers["x-simulator-service-ms"]) > 20


async def test_gemini_stream_sync_and_async(gem: genai.Client) -> None:
    plain = await gem.aio.models.generate_content(model="gemini-2.5-pro", contents=QUESTION)
    chunks = [
        c
        async for c in await gem.aio.models.generate_content_stream(model="gemini-2.5-pro", contents=QUESTION)
    ]
    assert len(chunks) > 5
    assert "".join(c.text or "" for c in chunks) == plain.text
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert last.usage_metadata and last.usage_metadata.candidates_token_count == approx_tokens(
        plain.text or ""
    )
    assert all(c.candidates and c.candidates[0].finish_reason is None for c in chunks[:-1])
    # The synchronous client (an httpx transport, not aiohttp) parses the same stream.
    sync_chunks = await asyncio.to_thread(
        lambda: list(gem.models.generate_content_stream(model="gemini-2.5-pro", contents=QUESTION))
    )
    assert "".join(c.text or "" for c in sync_chunks) == plain.text


async def test_gemini_max_output_tokens(gem: genai.Client) -> None:
    config = genai_types.GenerateContentConfig(max_output_tokens=10)
    r = await gem.aio.models.generate_content(model="gemini-2.0-flash-lite", contents=QUESTION, config=config)
    assert r.candidates and r.candidates[0].finish_reason == genai_types.FinishReason.MAX_TOKENS
    assert r.usage_metadata and r.usage_metadata.candidates_token_count == 10


def test_gemini_key_in_query_and_raw_sse(admin: httpx.Client) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}
    ok = admin.post(f"/v1beta/models/gemini-2.5-flash:generateContent?key={KEY}", json=body)
    assert ok.status_code == 200 and ok.json()["candidates"][0]["content"]["role"] == "model"
    sse = admin.post(f"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={KEY}", json=body)
    assert sse.text.startswith("data: {") and sse.text.endswith("\r\n\r\n")


# -- reference fusion and prompt caching ---------------------------------------------------------------


async def test_reference_fusion_in_all_protocols(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    shared = "Vaccines expose the body to a harmless antigen."
    refs = [
        f"{shared} Memory B cells then remember it.",
        f"- {shared}\n- T cells learn to recognise infected cells.",
        f"{shared} Boosters refresh the memory [...]",
    ]
    system = references(*refs)
    c = await oai.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "system", "content": system}, *MESSAGES]
    )
    text = c.choices[0].message.content or ""
    assert text.startswith("Synthesis of 3 references (merged: 1, 2, 3).")
    assert text.count(shared) == 1  # identical sentences are merged
    for distinct in (
        "Memory B cells then remember it.",
        "T cells learn to recognise infected cells.",
        "[...]",
    ):
        assert distinct in text
    m = await claude.messages.create(
        model="claude-opus-4-6", max_tokens=2000, system=system, messages=MESSAGES
    )
    assert m.content[0].text.startswith("Synthesis of 3 references (merged: 1, 2, 3).")  # type: ignore[union-attr]
    g = await gem.aio.models.generate_content(
        model="gemini-2.5-pro",
        contents=QUESTION,
        config=genai_types.GenerateContentConfig(
            system_instruction=references("A single earlier synthesis.")
        ),
    )
    assert (g.text or "").startswith("Synthesis of 1 references (merged: 1).")
    # References in a user message count too, and nested fusions do not repeat their headers.
    nested = await oai.chat.completions.create(
        model="gpt-4.1-mini",
        messages=[{"role": "user", "content": references(text, "Another view entirely.")}],
    )
    body = nested.choices[0].message.content or ""
    assert body.startswith("Synthesis of 2 references (merged: 1, 2).") and body.count("Synthesis of") == 1


async def test_prompt_caching_reports_cached_tokens(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    system = "You are a meticulous assistant. " * 160  # about 1280 tokens
    tokens = approx_message_tokens([system])
    expected = tokens // 128 * 128
    assert tokens >= 1024

    async def openai_cached() -> int:
        c = await oai.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "system", "content": system}, *MESSAGES], max_tokens=5
        )
        assert c.usage and c.usage.prompt_tokens_details
        return c.usage.prompt_tokens_details.cached_tokens or 0

    assert await openai_cached() == 0
    assert await openai_cached() == expected

    # The Messages API caches only what a request marks with cache_control.
    for _ in range(2):
        m = await claude.messages.create(
            model="claude-haiku-4-5", max_tokens=5, system=system, messages=MESSAGES
        )
    assert m.usage.cache_read_input_tokens == 0
    marked: Any = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        m = await claude.messages.create(
            model="claude-haiku-4-5", max_tokens=5, system=marked, messages=MESSAGES
        )
    assert m.usage.cache_read_input_tokens == expected
    # Anthropic reports input_tokens net of the cache reads.
    assert m.usage.input_tokens == approx_message_tokens([system, QUESTION]) - expected

    config = genai_types.GenerateContentConfig(system_instruction=system, max_output_tokens=5)
    for _ in range(2):
        g = await gem.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION, config=config)
    assert g.usage_metadata and g.usage_metadata.cached_content_token_count == expected


async def test_the_first_token_waits_for_the_uncached_prompt(
    oai: openai.AsyncOpenAI, admin: httpx.Client
) -> None:
    """Time to first token grows with the prompt, and what the prompt cache served is not read
    again: the service time (the simulator's own header) is ttft_s + uncached tokens / prefill
    rate + generation, with no jitter."""
    put_profile(
        admin,
        SimProfile(
            default=ModelProfile(ttft_s=0.0, tokens_per_s=1e6, prefill_tokens_per_s=20_000.0, jitter=0.0)
        ),
    )

    async def service(content: str) -> tuple[float, int, int, int]:
        raw = await oai.chat.completions.with_raw_response.create(
            model="gpt-4.1", messages=[{"role": "user", "content": content}], max_tokens=5
        )
        u = raw.parse().usage
        assert u and u.prompt_tokens_details
        ms = float(raw.headers["x-simulator-service-ms"])
        return ms, u.prompt_tokens, u.prompt_tokens_details.cached_tokens or 0, u.completion_tokens

    long = "Each reference repeats what the layer before it wrote, and more. " * 120  # ~1950 tokens
    for content, cached_expected in ((QUESTION, 0), (long, 0), (long, True)):
        ms, prompt, cached, out = await service(content)
        assert bool(cached) == bool(cached_expected)
        assert ms == pytest.approx(1000 * ((prompt - cached) / 20_000 + out / 1e6), abs=1e-3)
    # The long prompt's first token waited about 0.1 s for its ~1950 tokens; read again, only for
    # the part past its last cached block.
    assert prompt >= 1900 and cached == 1920 and ms < 1000 * 128 / 20_000 + 1


async def test_prompt_caching_serves_only_the_prefix_a_prompt_shares(
    oai: openai.AsyncOpenAI, admin: httpx.Client
) -> None:
    """As on the real APIs, a hit is the longest prefix seen before, in 128-token blocks from 1024
    on: a prompt that continues an earlier one reuses all of it, one that changes early none."""
    head = "Reference one says the immune system learns from a harmless copy. " * 80  # ~1340 tokens

    async def cached(*contents: str) -> tuple[int, int]:
        messages: Any = [{"role": "user", "content": c} for c in contents]
        c = await oai.chat.completions.create(model="gpt-4.1-mini", messages=messages, max_tokens=5)
        assert c.usage and c.usage.prompt_tokens_details
        return c.usage.prompt_tokens_details.cached_tokens or 0, c.usage.prompt_tokens

    assert (await cached(head))[0] == 0
    # The same head, then more: the head's whole blocks are read from the cache, not the rest.
    hit, total = await cached(head, "And reference two adds memory cells. " * 40)
    assert 1024 <= hit <= approx_tokens(head) < total
    assert hit % 128 == 0 and approx_tokens(head) - hit < 128
    # A change in the first characters: nothing is shared.
    assert (await cached("Changed. " + head))[0] == 0
    # POST /admin/reset forgets every cached prefix.
    assert (await cached(head))[0] > 0
    (await asyncio.to_thread(admin.post, "/admin/reset")).raise_for_status()
    assert (await cached(head))[0] == 0


# -- auth and bad requests -----------------------------------------------------------------------------


async def test_invalid_key_is_refused_as_each_api_refuses_it(
    sim: SimulatorServer, admin: httpx.Client
) -> None:
    bad = "sim-invalid-key-0123456789abcdef"  # any key starting with sim-invalid-key is wrong
    bad_openai = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key=bad, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as oe:
        await bad_openai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert oe.value.status_code == 401 and oe.value.code == "invalid_api_key"
    assert "sim-inva" + "*" * (len(bad) - 12) + "cdef" in oe.value.message  # masked, as OpenAI echoes it
    bad_claude = anthropic.AsyncAnthropic(base_url=sim.url, api_key=bad, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as ae:
        await bad_claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    assert ae.value.body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}  # type: ignore[index]
    bad_gemini = gemini_client(sim.url, key=bad)
    with pytest.raises(genai_errors.ClientError) as ge:
        await bad_gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION)
    # Gemini refuses a wrong key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID), not 401.
    assert ge.value.code == 400 and ge.value.status == "INVALID_ARGUMENT"
    assert ge.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    await bad_gemini.aio.aclose()
    await bad_openai.close()
    await bad_claude.close()
    assert sim_stats(admin) == {}  # refused before reaching a model


def test_missing_key_and_malformed_request_bodies(admin: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = admin.post("/v1/chat/completions", json={"model": "gpt-4.1", "messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["openai-processing-ms"] == "0" and float(r.headers["x-simulator-service-ms"]) == 0
    garbage = b'{"model": "gpt-4.1", "messages": ['
    r = admin.post("/v1/chat/completions", content=garbage, headers=auth)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = admin.post("/v1/messages", content=garbage, headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = admin.post(
        "/v1beta/models/gemini-2.5-flash:generateContent", content=garbage, headers={"x-goog-api-key": KEY}
    )
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
    r = admin.post("/v1/chat/completions", json={"model": "gpt-4.1"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert admin.get("/nowhere").status_code == 404


# -- generation parameters, checked as each API checks them ------------------------------------------

ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GEMINI_HEADERS = {"x-goog-api-key": KEY}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}


def openai_chat(admin: httpx.Client, **params: Any) -> httpx.Response:
    return post(admin, "/v1/chat/completions", {"model": "gpt-4.1", "messages": MESSAGES, **params})


def anthropic_message(admin: httpx.Client, model: str = "claude-haiku-4-5", **params: Any) -> httpx.Response:
    body = {"model": model, "max_tokens": 20, "messages": MESSAGES, **params}
    return post(admin, "/v1/messages", body, ANTHROPIC_HEADERS)


def gemini_generate(admin: httpx.Client, **config: Any) -> httpx.Response:
    body = {**GEMINI_BODY, "generationConfig": config}
    return post(admin, "/v1beta/models/gemini-2.5-flash:generateContent", body, GEMINI_HEADERS)


def recent_requests(admin: httpx.Client) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], admin.get("/admin/requests").json()["requests"])


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"top_p": 1.5}, "top_p", "decimal_above_max_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "integer_below_min_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"seed": 1.5}, "seed", "invalid_type"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({"stop": [1]}, "stop", "invalid_type"),
    ],
)
def test_openai_refuses_bad_generation_parameters(
    admin: httpx.Client, params: dict[str, Any], param: str, code: str
) -> None:
    r = openai_chat(admin, **params)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert f"'{param}'" in err["message"]


def test_openai_accepts_every_generation_parameter_and_names_unknown_ones(admin: httpx.Client) -> None:
    r = openai_chat(admin, top_k=5)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: top_k"
    params = {
        "temperature": 2,
        "top_p": 1,
        "max_completion_tokens": 30,
        "stop": ["x", "y", "z", "w"],
        "seed": 7,
    }
    assert openai_chat(admin, **params).status_code == 200
    assert openai_chat(admin, max_tokens=9, stop="q").status_code == 200
    seen = recent_requests(admin)
    assert [r["params"] for r in seen] == [
        {"temperature": 2.0, "top_p": 1.0, "max_tokens": 30, "stop": ["x", "y", "z", "w"], "seed": 7},
        {"max_tokens": 9, "stop": ["q"]},
    ]
    assert seen[0]["api"] == "openai" and seen[0]["model"] == "gpt-4.1" and seen[0]["refused"] is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
        ({"top_p": 1.01}, "top_p: Input should be less than or equal to 1"),
        ({"top_p": "x"}, "top_p: Input should be a valid number"),
        ({"seed": 7}, "seed: Extra inputs are not permitted"),
        ({"stop_sequences": "x"}, "stop_sequences: Input should be a valid list"),
        ({"stop_sequences": ["x", 2]}, "stop_sequences.1: Input should be a valid string"),
        (
            {"temperature": 0.5, "top_p": 0.9},
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
        ),
    ],
)
def test_anthropic_refuses_bad_generation_parameters(
    admin: httpx.Client, params: dict[str, Any], message: str
) -> None:
    r = anthropic_message(admin, **params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"] == {"type": "invalid_request_error", "message": message}


def test_anthropic_accepts_what_the_api_accepts(admin: httpx.Client) -> None:
    stops = [f"<stop{i}>" for i in range(12)]  # no small limit on stop sequences
    assert anthropic_message(admin, temperature=1, stop_sequences=stops).status_code == 200
    assert anthropic_message(admin, top_p=0.5, top_k=40).status_code == 200
    # A model whose profile says so accepts temperature and top_p together (as older Claude models did).
    put_profile(admin, SimProfile(models={"claude-3-*": ModelProfile(exclusive_sampling=False, ttft_s=0)}))
    assert anthropic_message(admin, "claude-3-haiku", temperature=0.2, top_p=0.9).status_code == 200
    assert [r["params"] for r in recent_requests(admin)] == [
        {"temperature": 1.0, "max_tokens": 20, "stop": stops},
        {"top_p": 0.5, "max_tokens": 20},
        {"temperature": 0.2, "top_p": 0.9, "max_tokens": 20},
    ]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"temperature": 2.5}, "temperature must be in the range [0.0, 2.0]"),
        ({"topP": 1.5}, "top_p must be in the range [0.0, 1.0]"),
        ({"top_p": -0.5}, "top_p must be in the range [0.0, 1.0]"),
        ({"seed": "x"}, "generation_config.seed"),
        ({"maxOutputTokens": 1.5}, "generation_config.max_output_tokens"),
        ({"stopSequences": list("abcdef")}, "stopSequences value of 6"),
        ({"topQ": 1}, "Unknown name \"topQ\" at 'generation_config': Cannot find field."),
    ],
)
def test_gemini_refuses_bad_generation_parameters(
    admin: httpx.Client, config: dict[str, Any], fragment: str
) -> None:
    r = gemini_generate(admin, **config)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["status"] == "INVALID_ARGUMENT" and fragment in err["message"]


def test_gemini_accepts_every_generation_parameter_in_both_spellings(admin: httpx.Client) -> None:
    config = {"temperature": 2, "topP": 1, "maxOutputTokens": 40, "stopSequences": list("vwxyz"), "seed": 3}
    assert gemini_generate(admin, **config).status_code == 200
    assert gemini_generate(admin, top_p=0.5, max_output_tokens=8, stop_sequences=["q"]).status_code == 200
    r = post(
        admin, "/v1beta/models/gemini-2.5-flash:generateContent", {**GEMINI_BODY, "n": 1}, GEMINI_HEADERS
    )
    assert r.status_code == 400 and 'Unknown name "n": Cannot find field.' in r.json()["error"]["message"]
    assert [r["params"] for r in recent_requests(admin)] == [
        {"temperature": 2.0, "top_p": 1.0, "max_tokens": 40, "stop": list("vwxyz"), "seed": 3},
        {"top_p": 0.5, "max_tokens": 8, "stop": ["q"]},
    ]


def test_a_profile_makes_a_model_refuse_parameters_in_its_apis_words(admin: httpx.Client) -> None:
    refusing = ModelProfile(ttft_s=0, refuses=("temperature", "seed"))
    models = {"gpt-4.1": refusing, "claude-haiku-4-5": refusing, "gemini-2.5-flash": refusing}
    put_profile(admin, SimProfile(models=models))
    r = openai_chat(admin, temperature=0.3)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Unsupported parameter: 'temperature' is not supported with this model.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_parameter",
    }
    r = anthropic_message(admin, temperature=0.3)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "`temperature` is deprecated for this model."
    r = gemini_generate(admin, seed=4)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "seed is not enabled for models/gemini-2.5-flash"
    # Without the refused parameters every model answers; a refused request never reaches the model.
    assert openai_chat(admin, top_p=0.5).status_code == 200
    assert anthropic_message(admin, top_p=0.5).status_code == 200
    assert gemini_generate(admin, topP=0.5).status_code == 200
    assert {m: s["requests"] for m, s in sim_stats(admin).items()} == dict.fromkeys(models, 1)
    refused = [(r["api"], r["refused"] is not None) for r in recent_requests(admin)]
    assert refused == [
        ("openai", True),
        ("anthropic", True),
        ("gemini", True),
        ("openai", False),
        ("anthropic", False),
        ("gemini", False),
    ]
    admin.post("/admin/reset").raise_for_status()
    assert recent_requests(admin) == []


# -- faults through the SDKs ---------------------------------------------------------------------------


async def test_rate_limit_429_says_the_wait_where_each_provider_does(
    admin: httpx.Client, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    """OpenAI: the spent limit's reset header, no Retry-After; Anthropic: ``retry-after`` and the
    spent limit's RFC 3339 reset; Gemini: a ``RetryInfo`` in the body, no header."""
    set_fault(admin, "*", error_429={"rate": 1.0, "retry_after_s": 0.2})
    with pytest.raises(openai.RateLimitError) as oe:
        await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    oh = oe.value.response.headers
    assert "retry-after" not in oh and oe.value.code == "rate_limit_exceeded"
    assert (oh["x-ratelimit-remaining-requests"], oh["x-ratelimit-reset-requests"]) == ("0", "200ms")
    assert oh["openai-processing-ms"] == "0"
    before = time.time()
    with pytest.raises(anthropic.RateLimitError) as ae:
        await claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    ah = ae.value.response.headers
    assert ah["retry-after"] == "0.2" and ah["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.fromisoformat(ah["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    assert before < reset.timestamp() <= time.time() + 1.2
    assert ae.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(genai_errors.ClientError) as ge:
        await gem.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION)
    assert ge.value.code == 429 and ge.value.status == "RESOURCE_EXHAUSTED"
    assert "retry-after" not in ge.value.response.headers
    retry = [d for d in ge.value.details["error"]["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.200s"}]
    s = sim_stats(admin)
    assert s["gpt-4.1"]["faults"] == {"error_429": 1} and s["gpt-4.1"]["completed"] == 0


async def test_server_errors_500_and_503(
    admin: httpx.Client, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    set_fault(admin, "gpt-*", error_500={})
    set_fault(admin, "claude-*", error_503={})
    set_fault(admin, "gemini-*", error_503={})
    with pytest.raises(openai.InternalServerError) as oe:
        await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
    assert oe.value.status_code == 500 and oe.value.type == "server_error"
    with pytest.raises(anthropic.InternalServerError) as ae:
        await claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    assert ae.value.status_code == 529 and ae.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    with pytest.raises(genai_errors.ServerError) as ge:
        await gem.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION)
    assert ge.value.code == 503 and ge.value.status == "UNAVAILABLE"


async def test_malformed_json_and_wrong_content_type(
    admin: httpx.Client, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    short: Any = {"max_tokens": 20}
    set_fault(admin, "*", malformed_json={})
    with pytest.raises(json.JSONDecodeError):  # raised unwrapped by the SDKs
        await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, **short)
    with pytest.raises(json.JSONDecodeError):
        await claude.messages.create(model="claude-haiku-4-5", messages=MESSAGES, **short)
    stream = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True, **short)
    with pytest.raises(json.JSONDecodeError):
        [c async for c in stream]
    with pytest.raises(genai_errors.UnknownApiResponseError):
        [
            c
            async for c in await gem.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents="hi"
            )
        ]

    set_fault(admin, "*", wrong_content_type={})
    r = post(admin, "/v1/chat/completions", {"model": "gpt-4.1", "messages": MESSAGES, **short})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # The OpenAI SDK does not raise: it returns the HTML as a str instead of a ChatCompletion.
    weird = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, **short)
    assert isinstance(weird, str) and weird.startswith("<!DOCTYPE html>")
    with pytest.raises(json.JSONDecodeError):
        await gem.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    s = sim_stats(admin)
    assert s["gpt-4.1"]["completed"] == 0 and s["gpt-4.1"]["faults"] == {
        "malformed_json": 2,
        "wrong_content_type": 2,
    }


async def test_cut_stream(
    admin: httpx.Client, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    set_fault(admin, "*", cut_stream={})
    stream = await oai.chat.completions.create(
        model="gpt-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    got: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            got.append(chunk)
    assert got and all(not c.choices or c.choices[0].finish_reason is None for c in got)
    # The Anthropic SDK (on httpx2) and google-genai (on aiohttp) raise their transport's error unwrapped.
    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):
        async with claude.messages.stream(model="claude-haiku-4-5", max_tokens=500, messages=MESSAGES) as ms:
            await ms.get_final_message()
    with pytest.raises(aiohttp.ClientPayloadError, match="not completed"):
        [
            c
            async for c in await gem.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents="hi"
            )
        ]
    # Not streaming: a JSON body cut in half.
    with pytest.raises(json.JSONDecodeError):
        await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    s = sim_stats(admin)
    assert s["gpt-4.1"]["faults"] == {"cut_stream": 2} and s["gpt-4.1"]["in_flight"] == 0


@pytest.mark.parametrize("streaming", [False, True])
async def test_hang_then_cancel_releases_in_flight(
    sim: SimulatorServer, admin: httpx.Client, streaming: bool
) -> None:
    set_fault(admin, "gpt-4.1", hang={"rate": 1.0})
    body = {"model": "gpt-4.1", "messages": MESSAGES, "stream": streaming}
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(
            client.post(
                f"{sim.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
        )
        await wait_until(
            lambda: sim_stats(admin).get("gpt-4.1", {}).get("in_flight"), lambda n: n == 1, what="in flight"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The hang has no end of its own: only the server noticing the disconnect can end it.
        s = await wait_idle(admin, interval=0.01)
    stats = s["gpt-4.1"]
    # The prompt of a request it accepted is billed; a hang generated nothing.
    assert stats.pop("billed_input_tokens") > 0 and stats.pop("billed_output_tokens") == 0
    assert stats == {
        "requests": 1,
        "in_flight": 0,
        "max_in_flight": 1,
        "completed": 0,
        "faults": {"hang": 1},
        "cancelled": 1,
    }


async def test_closing_a_stream_midway_cancels_it(oai: openai.AsyncOpenAI, admin: httpx.Client) -> None:
    put_profile(admin, SimProfile(default=ModelProfile(ttft_s=0.0, tokens_per_s=100.0, jitter=0.0)))
    stream = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    s = await wait_idle(admin, interval=0.01)
    assert (
        s["gpt-4.1"]["in_flight"] == 0 and s["gpt-4.1"]["cancelled"] == 1 and s["gpt-4.1"]["completed"] == 0
    )


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_stall_sends_about_so_many_tokens_then_nothing_and_bills_them(
    oai: openai.AsyncOpenAI, admin: httpx.Client, streaming: bool
) -> None:
    """``stall``: a stream sends about ``after_tokens`` tokens and then nothing, its connection
    open, until the client leaves; it is billed for exactly the text it sent. A plain request
    never answers, and is billed for those tokens too once the model would have written them."""
    set_fault(admin, "gpt-4.1", stall={"rate": 1.0, "after_tokens": 12})
    text = ""

    async def read() -> None:
        nonlocal text
        if not streaming:
            await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
            return
        stream = await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""

    reading = asyncio.ensure_future(read())
    if streaming:
        await wait_until(lambda: approx_tokens(text), lambda n: n >= 12, what="the tokens before the stall")
    await asyncio.sleep(0.3)  # the model has written its tokens (the FAST profile: 8,000 a second)
    assert not reading.done()  # the answer never ends
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    s = (await wait_idle(admin, interval=0.01))["gpt-4.1"]
    assert s["faults"] == {"stall": 1} and s["cancelled"] == 1 and s["completed"] == 0
    assert s["billed_output_tokens"] == (approx_tokens(text) if streaming else 12)
    assert 12 <= s["billed_output_tokens"] <= 14


async def test_sdk_timeouts_release_in_flight(
    sim: SimulatorServer, admin: httpx.Client, claude: anthropic.AsyncAnthropic, gem: genai.Client
) -> None:
    set_fault(admin, "*", hang={})
    impatient = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key=KEY, max_retries=0, timeout=0.2)
    results = await asyncio.gather(
        impatient.chat.completions.create(model="gpt-4.1", messages=MESSAGES),
        asyncio.wait_for(
            claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES), 0.2
        ),
        asyncio.wait_for(gem.aio.models.generate_content(model="gemini-2.5-flash", contents="hi"), 0.2),
        return_exceptions=True,
    )
    await impatient.close()
    assert [type(r) for r in results] == [openai.APITimeoutError, TimeoutError, TimeoutError]
    s = await wait_idle(admin, interval=0.01)
    assert len(s) == 3 and all(m["in_flight"] == 0 and m["cancelled"] == 1 for m in s.values())


async def test_hang_s_answers_late_and_slow_stream_is_slower(
    oai: openai.AsyncOpenAI, admin: httpx.Client
) -> None:
    set_fault(admin, "gpt-4.1", hang={"rate": 1.0, "hang_s": 0.2})
    t0 = time.monotonic()
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=MESSAGES, max_tokens=20
    )
    assert time.monotonic() - t0 >= 0.2 and float(raw.headers["x-simulator-service-ms"]) >= 200
    assert int(raw.headers["openai-processing-ms"]) >= 200
    assert raw.parse().choices[0].finish_reason == "length"

    set_fault(admin, "gpt-4.1-mini", slow_stream={"rate": 1.0, "factor": 20})
    t0 = time.monotonic()
    stream = await oai.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini", messages=MESSAGES, max_tokens=30, stream=True
    )
    service = float(stream.headers["x-simulator-service-ms"]) / 1000
    prompt = approx_message_tokens([QUESTION])  # read at the default 10,000 tokens/s
    assert service == pytest.approx(0.02 + prompt / 10_000 + 30 * 20 / FAST_TOKENS_PER_S, abs=1e-6)
    [c async for c in cast(openai.AsyncStream[Any], stream.parse())]
    assert time.monotonic() - t0 >= service - 0.01  # the stream is paced, not just labelled
    s = sim_stats(admin)
    assert s["gpt-4.1"]["completed"] == 1 and s["gpt-4.1-mini"]["faults"] == {"slow_stream": 1}


async def test_first_n_faults_are_deterministic(oai: openai.AsyncOpenAI, admin: httpx.Client) -> None:
    async def outcome() -> str:
        try:
            await oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, max_tokens=5)
            return "ok"
        except openai.InternalServerError:
            return "500"

    set_fault(admin, "gpt-4.1", error_500={"first_n": 2})
    assert [await outcome() for _ in range(4)] == ["500", "500", "ok", "ok"]
    set_fault(admin, "gpt-4.1", error_500={"first_n": 1})  # a newly set fault counts afresh
    assert [await outcome() for _ in range(2)] == ["500", "ok"]


async def test_fault_rates_are_probabilities(oai: openai.AsyncOpenAI, admin: httpx.Client) -> None:
    set_fault(admin, "gpt-4o-mini", error_503={"rate": 0.5})
    results = await asyncio.gather(
        *(
            oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
            for _ in range(40)
        ),
        return_exceptions=True,
    )
    failures = sum(isinstance(r, openai.InternalServerError) for r in results)
    assert 8 <= failures <= 32 and failures + sum(not isinstance(r, Exception) for r in results) == 40


async def test_concurrency_counters(oai: openai.AsyncOpenAI, admin: httpx.Client) -> None:
    def ask() -> Any:
        return oai.chat.completions.create(model="gpt-4.1", messages=MESSAGES, max_tokens=5)

    # Six requests that never answer are all in flight at once, however slowly they arrive.
    set_fault(admin, "gpt-4.1", hang={})
    hanging = [asyncio.create_task(ask()) for _ in range(6)]
    await wait_until(
        lambda: sim_stats(admin).get("gpt-4.1", {}).get("in_flight"), lambda n: n == 6, what="six in flight"
    )
    for task in hanging:
        task.cancel()
    await asyncio.gather(*hanging, return_exceptions=True)
    s = (await wait_idle(admin, interval=0.01))["gpt-4.1"]
    assert (s["requests"], s["max_in_flight"], s["cancelled"], s["completed"]) == (6, 6, 6, 0)
    # Answered requests count as completed, and the peak stays the peak.
    set_fault(admin, "gpt-4.1")  # no faults
    await asyncio.gather(*(ask() for _ in range(6)))
    s = sim_stats(admin)["gpt-4.1"]
    assert (s["requests"], s["completed"], s["in_flight"], s["max_in_flight"]) == (12, 6, 0, 6)


# -- admin API -----------------------------------------------------------------------------------------


def test_admin_endpoints(admin: httpx.Client) -> None:
    assert admin.get("/admin/stats").json() == {"models": {}, "total_requests": 0, "embedding_requests": 0}
    r = admin.put("/admin/faults/claude-*", json={"error_429": {"rate": 0.5, "retry_after_s": 2}})
    assert r.status_code == 200
    assert admin.get("/admin/faults/claude-haiku-4-5").json() == {
        "error_429": {"rate": 0.5, "retry_after_s": 2.0}
    }
    assert admin.get("/admin/faults/gpt-4.1").json() == {}
    profile = admin.get("/admin/profile").json()
    assert profile["faults"]["claude-*"]["error_429"]["rate"] == 0.5
    assert profile["default"]["ttft_s"] == 0.02  # fault overrides leave latencies alone
    bad = admin.put("/admin/faults/x", json={"error_429": {"rate": 2}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["error_429", "rate"]
    assert admin.put("/admin/faults/x", json={"explode": {}}).status_code == 422
    assert admin.delete("/admin/faults/claude-*").json() == {"model": "claude-*", "deleted": True}
    assert admin.delete("/admin/faults/claude-*").status_code == 404
    new = SimProfile(default=ModelProfile(ttft_s=0.01), models={"gpt-4.1": ModelProfile(style="concise")})
    r = admin.put("/admin/profile", json=new.model_dump(mode="json"))
    assert r.status_code == 200 and SimProfile.model_validate(r.json()) == new
    assert admin.put("/admin/profile", json={"default": {"ttft_s": -1}}).status_code == 422
    admin.post(
        "/v1/chat/completions",
        json={"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 3},
        headers={"Authorization": f"Bearer {KEY}"},
    ).raise_for_status()
    assert admin.get("/admin/stats").json()["total_requests"] == 1
    admin.post("/admin/reset").raise_for_status()  # counters only: the profile stays
    assert admin.get("/admin/stats").json() == {"models": {}, "total_requests": 0, "embedding_requests": 0}
    assert SimProfile.model_validate(admin.get("/admin/profile").json()) == new
    assert admin.get("/admin/nothing").status_code == 404


# -- profiles ------------------------------------------------------------------------------------------


def test_profile_matching() -> None:
    fast, slow, haiku = ModelProfile(ttft_s=0.01), ModelProfile(ttft_s=1.0), ModelProfile(ttft_s=0.5)
    p = SimProfile(
        default=ModelProfile(ttft_s=0.3),
        models={"claude-*": slow, "claude-haiku-*": haiku, "gpt-4.1": fast},
        faults={"*": Faults(error_500=FaultSpec(rate=0.1)), "gpt-4.1": Faults(error_429=RateFault())},
    )
    assert p.for_model("gpt-4.1").ttft_s == 0.01  # exact
    assert p.for_model("claude-sonnet-4-6").ttft_s == 1.0  # glob
    assert p.for_model("claude-haiku-4-5").ttft_s == 0.5  # the most specific glob
    assert p.for_model("gemini-2.5-pro").ttft_s == 0.3  # default
    assert p.for_model("gpt-4.1").faults == Faults(error_429=RateFault())  # exact fault override
    assert p.for_model("claude-haiku-4-5").faults.error_500 == FaultSpec(rate=0.1)


def test_load_profile_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "sim.yaml"
    y.write_text(
        "default: {ttft_s: 0.1, tokens_per_s: 80}\n"
        "models:\n  'claude-*': {ttft_s: 0.5, output_tokens: [50, 60], style: academic}\n"
        "faults:\n  gpt-4.1: {error_429: {rate: 0.3, retry_after_s: 2}, hang: {first_n: 1}}\n"
    )
    p = load_profile(y)
    assert p.default.tokens_per_s == 80 and p.models["claude-*"].output_tokens == (50, 60)
    assert p.faults["gpt-4.1"].error_429 == RateFault(rate=0.3, retry_after_s=2)
    j = tmp_path / "sim.json"
    j.write_text(json.dumps(p.model_dump(mode="json")))
    assert load_profile(j) == p


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("default: {ttft_s: -1}", r"default\.ttft_s"),
        ("models: {gpt: {faults: {error_429: {rate: 3}}}}", r"models\.gpt\.faults\.error_429\.rate"),
        ("models: {gpt: {style: baroque}}", r"models\.gpt\.style: .*unknown style 'baroque'"),
        ("models: {gpt: {output_tokens: [90, 10]}}", r"models\.gpt\.output_tokens"),
        ("faults: {'*': {meltdown: {rate: 1}}}", r"faults\.\*\.meltdown"),
        ("default: [1, 2", r"not valid YAML"),
        ("- just a list", r"must be a mapping"),
    ],
)
def test_load_profile_errors_name_file_and_field(tmp_path: Path, content: str, expected: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(ProfileError, match=expected) as err:
        load_profile(f)
    assert str(f) in str(err.value)


def test_load_profile_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"cannot read simulator profile .*nope\.yaml"):
        load_profile(tmp_path / "nope.yaml")


async def test_output_tokens_range_is_respected(oai: openai.AsyncOpenAI, admin: httpx.Client) -> None:
    p = SimProfile(default=ModelProfile(ttft_s=0.0, tokens_per_s=1e6, jitter=0.0, output_tokens=(150, 160)))
    put_profile(admin, p)
    for q in ("Why is the sea salty?", "Explain how compilers optimise loops.", QUESTION):
        c = await oai.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": q}])
        assert c.usage is not None and 140 <= c.usage.completion_tokens <= 200


# -- server and CLI ------------------------------------------------------------------------------------


def test_server_lifecycle_and_stop_with_a_hanging_request() -> None:
    profile = SimProfile(default=ModelProfile(ttft_s=0.0, jitter=0.0), faults={"*": Faults(hang=HangFault())})
    server = SimulatorServer(profile).start()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url) and server.port > 0
    result: list[int] = []

    def call() -> None:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "m", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        result.append(r.status_code)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until_sync(lambda: server.app.state.snapshot()["total_requests"], what="the request to arrive")
    # The hang has no end of its own: the caller gets an answer only if stopping ends it.
    server.stop()
    caller.join(30)
    assert not caller.is_alive() and result == [503]  # answered "unavailable" on shutdown
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/admin/stats")


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="moa")
    sim_cli.register(root.add_subparsers(dest="command"))
    return root


def test_cli_builds_the_profile_and_announces_urls(
    parser: argparse.ArgumentParser,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("default: {ttft_s: 0.5}\nfaults: {gpt-4.1: {error_500: {rate: 0.1}}}\n")
    seen: dict[str, Any] = {}

    def fake_serve(profile: SimProfile, host: str, port: int, *, on_ready: Any) -> None:
        seen.update(profile=profile, host=host, port=port)
        on_ready(f"http://{host}:{port}")

    monkeypatch.setattr(sim_cli, "serve_forever", fake_serve)
    args = parser.parse_args(
        [
            "simulate",
            "--port", "8999",
            "--profile", str(f),
            "--tps", "120",
            "--jitter", "0",
            "--fault", "gpt-4.1:error_429=0.3",
            "--fault", "*:hang=1",
            "--fault", "ft:gpt-4o:org:cut_stream=0.5",
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    p: SimProfile = seen["profile"]
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8999)
    assert (p.default.ttft_s, p.default.tokens_per_s, p.default.jitter) == (0.5, 120, 0)
    assert p.faults["gpt-4.1"] == Faults(error_500=FaultSpec(rate=0.1), error_429=RateFault(rate=0.3))
    assert p.faults["*"].hang is not None and p.faults["ft:gpt-4o:org"].cut_stream == FaultSpec(rate=0.5)
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8999/v1" in out and "base_url='http://127.0.0.1:8999'" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault", "gpt-4.1:explode=1"], "unknown fault kind 'explode'"),
        (["--fault", "gpt-4.1=1"], "expected MODEL:KIND=RATE"),
        (["--fault", "gpt-4.1:hang=2"], "between 0 and 1"),
        (["--tps", "-3"], "tokens_per_s"),
        (["--profile", "/nonexistent/profile.yaml"], "cannot read simulator profile"),
    ],
)
def test_cli_rejects_bad_arguments(
    parser: argparse.ArgumentParser, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser.parse_args(["simulate", *argv])
    assert sim_cli.run(args) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_busy_port(
    parser: argparse.ArgumentParser, simulator: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser.parse_args(["simulate", "--port", str(simulator.port)])
    assert sim_cli.run(args) == 1
    assert "cannot listen" in capsys.readouterr().err


def test_the_simulator_never_imports_ray() -> None:
    code = "import sys, moa.simulator.server, moa.cli.simulator; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_simulator_does_not_hold_answers_for_delayed_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On asyncio's own loop (where uvloop is not installed) the simulator's socket names TCP, so
    asyncio turns Nagle's algorithm off: an answer written in two pieces is not held 40 ms for the
    client's delayed acknowledgement, which every simulated call used to add to a benchmark."""
    import moa.simulator.server as server
    from tests.helpers import kept_alive_gets

    monkeypatch.setattr(server, "_HAS_UVLOOP", False)
    with server.SimulatorServer() as sim:
        times = kept_alive_gets(sim.url, "/admin/stats")
    assert sorted(times)[len(times) // 2] < 0.030, [round(1000 * t, 1) for t in times]
