"""Fidelity to the real providers, checked against their own published bodies (tests/fixtures/providers).

Two directions, so neither side can drift from the real wire formats unnoticed:

- the adapters: each reference body is served verbatim from a loopback server and the real adapter
  (official SDK inside) must normalise it right: text, usage (cached tokens, Anthropic's input net of
  cache reads), finish reason, model, and every error typed;
- the simulator: each reference request goes through it and its answer must have the reference's
  shape (same keys at every level, same JSON types, same event order); values may differ.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from moa.config import MoAConfig, resolve_endpoint
from moa.providers.client import ProviderClient
from moa.providers.registry import build_client
from moa.simulator.server import SimulatorServer
from moa.simulator.wire import json_type
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind
from tests.test_providers import MODELS, collect, provider_config

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
MESSAGES = (ChatMessage(role="user", content="Hello!"),)


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sse_events(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) for each event of an SSE body; ``[DONE]`` stays a string."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            text = "\n".join(data)
            events.append((name, text if text == "[DONE]" else json.loads(text)))
    return events


# -- shapes ------------------------------------------------------------------------------------------


def kind(v: Any) -> str:
    """A JSON value's type (integers apart from other numbers, as the shapes must keep them)."""
    name = json_type(v)
    return "number" if name == "decimal" else name


def shape_diffs(ref: Any, got: Any, optional: frozenset[str] = frozenset(), path: str = "$") -> list[str]:
    """Where ``got`` differs in shape from ``ref``: keys missing or extra at any level, JSON types.

    Arrays are compared element by element, each against the reference's element at the same
    index (elements past the reference's last against its last: a longer list of parts or chunks
    of one kind), and an array shorter than the reference is a difference. ``optional``
    names paths ("$.usage.service_tier", "$.choices[].logprobs") that may be present on either side
    only; every use says which reference documents the difference.
    """
    if kind(ref) != kind(got):
        return [f"{path}: {kind(ref)} in the reference, {kind(got)} from the simulator"]
    if isinstance(ref, dict):
        diffs = []
        for key in sorted(ref.keys() | got.keys()):
            sub = f"{path}.{key}"
            if key not in got:
                diffs += [] if sub in optional else [f"{sub}: missing from the simulator's answer"]
            elif key not in ref:
                diffs += [] if sub in optional else [f"{sub}: not in the reference"]
            else:
                diffs += shape_diffs(ref[key], got[key], optional, sub)
        return diffs
    if isinstance(ref, list) and ref:
        sub = path + "[]"
        diffs = [
            d
            for i, item in enumerate(got)
            for d in shape_diffs(ref[min(i, len(ref) - 1)], item, optional, sub)
        ]
        if len(got) < len(ref) and sub not in optional:
            diffs.append(f"{sub}: {len(ref)} elements in the reference, {len(got)} from the simulator")
        return diffs
    return []


def assert_shape(ref: Any, got: Any, optional: frozenset[str] = frozenset()) -> None:
    diffs = shape_diffs(ref, got, optional)
    assert not diffs, "the simulator drifted from the reference:\n  " + "\n  ".join(diffs)


def collapse(seq: list[str]) -> list[str]:
    """A sequence with runs of the same item reduced to one (any number of deltas is one step)."""
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


# -- a loopback server that answers with reference bodies ---------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


async def read_body(receive: Any) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


class FixtureServer:
    """An ASGI app on uvicorn, in a thread: answers every request with ``reply`` and records it."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.reply = Reply(500, b"{}")
        self.requests: list[tuple[str, dict[str, str], Any]] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["path"], headers, json.loads(body) if body else None))
        r = self.reply
        extra = [(k.encode(), v.encode()) for k, v in r.headers.items()]
        start = {"type": "http.response.start", "status": r.status}
        start["headers"] = [(b"content-type", r.content_type.encode()), *extra]
        await send(start)
        await send({"type": "http.response.body", "body": r.body})

    def __enter__(self) -> FixtureServer:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", interface="asgi3"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the fixture server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def serve(server: FixtureServer, body: bytes, status: int = 200, **headers: str) -> None:
    stream = body.startswith((b"data:", b"event:"))
    server.reply = Reply(status, body, "text/event-stream" if stream else "application/json", headers)
    server.requests.clear()


def config_for(url: str) -> MoAConfig:
    # One attempt, so an error's typing (and its Retry-After) is what the call reports.
    return provider_config(url, retry={"max_attempts": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.01})


def client_for(provider: str, url: str, key: str | None = None) -> ProviderClient:
    cfg = config_for(url)
    endpoint = resolve_endpoint(cfg, provider, sim_url=url)
    if key is not None:
        assert endpoint.api_key is not None
        endpoint = endpoint.model_copy(update={"api_key": type(endpoint.api_key)(key)})
    return build_client(provider, cfg.providers[provider], endpoint)


def req(provider: str) -> CallRequest:
    return CallRequest(provider=provider, model=MODELS[provider], messages=MESSAGES)


async def streamed(client: ProviderClient, provider: str) -> tuple[str, CallResult]:
    return await collect(client.stream(req(provider)))


# -- the adapters against reference bodies -------------------------------------------------------------


async def test_openai_completion_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("openai/chat_completion.response.json"))
    res = await served_clients["openai"].complete(req("openai"))
    assert res.ok, res.error
    assert (res.text, res.model, res.finish_reason) == (
        "Hello! How can I assist you today?",
        "gpt-5.4",
        "stop",
    )
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (19, 10, 0)


async def test_openai_cached_tokens_are_counted_within_the_prompt(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    # The reference completion with the prompt caching guide's usage: cached tokens are part of
    # prompt_tokens, so input stays 2006 and 1920 of them are priced as cached.
    body = load("openai/chat_completion.response.json") | {"usage": load("openai/usage_prompt_caching.json")}
    serve(served, json.dumps(body).encode())
    res = await served_clients["openai"].complete(req("openai"))
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (2006, 300, 1920)
    assert res.cost_usd == pytest.approx(((2006 - 1920) * 1.0 + 1920 * 0.5 + 300 * 4.0) / 1e6)


async def test_openai_stream_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("openai/chat_completion.stream.sse"))
    text, res = await streamed(served_clients["openai"], "openai")
    assert res.ok, res.error
    assert text == res.text == "Hello" and res.model == "gpt-4o-mini" and res.finish_reason == "stop"
    # The adapter always asks for the usage chunk.
    assert served.requests[0][2]["stream_options"] == {"include_usage": True}


async def test_openai_stream_usage_chunk_is_read(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("openai/chat_completion.stream_usage.sse"))
    text, res = await streamed(served_clients["openai"], "openai")
    assert text == "Hello" and res.finish_reason == "stop"
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (2006, 300, 1920)


async def test_anthropic_message_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("anthropic/message.response.json"))
    res = await served_clients["anthropic"].complete(req("anthropic"))
    assert res.ok, res.error
    assert (res.text, res.model, res.finish_reason) == (
        "Hi! My name is Claude.",
        "claude-sonnet-4-20250514",
        "stop",
    )
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (2095, 503, 0)


async def test_anthropic_input_counts_cache_reads_and_writes(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    # Anthropic's input_tokens exclude cache reads and writes (the caching guide: total input is
    # the sum of the three); ours count every input token, and the reads are the cached ones.
    body = load("anthropic/message.response.json") | load("anthropic/usage_prompt_caching.json")
    serve(served, json.dumps(body).encode())
    res = await served_clients["anthropic"].complete(req("anthropic"))
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (
        2048 + 1800 + 248,
        503,
        1800,
    )


async def test_anthropic_stream_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("anthropic/stream.sse"))
    text, res = await streamed(served_clients["anthropic"], "anthropic")
    assert res.ok, res.error
    assert text == res.text == "Hello!" and res.finish_reason == "stop"
    assert res.model == "claude-sonnet-4-5-20250929"
    # Input from message_start, output from message_delta (cumulative: the final count).
    assert (res.usage.input_tokens, res.usage.output_tokens) == (25, 15)


async def test_anthropic_error_event_mid_stream_is_an_overload(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    # The stream's HTTP status is 200; the error event's own type says what went wrong.
    serve(
        served,
        raw("anthropic/stream.sse").split(b"event: content_block_stop")[0]
        + raw("anthropic/stream_error.sse"),
    )
    text, res = await streamed(served_clients["anthropic"], "anthropic")
    assert text == "Hello!"
    assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR, res.error
    assert "Overloaded" in res.error.message


async def test_openai_error_chunk_mid_stream_is_the_providers_server_error(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    """OpenAI reports a failure after the 200 as a chunk carrying ``error`` (the SDK's stream raises
    ``openai.APIError`` for it, with no status): the provider's failure, typed by the error's own
    ``type``, never one of ours. The chunk is the reference's 500 body framed as a ``data:`` line
    (ours: OpenAI publishes no example of a streamed error)."""
    first = raw("openai/chat_completion.stream.sse").split(b"\n\n")[:2]
    error = json.dumps(load("openai/error_500_server_error.json")).encode()
    serve(served, b"\n\n".join([*first, b"data: " + error]) + b"\n\n")
    text, res = await streamed(served_clients["openai"], "openai")
    assert text == "Hello"
    assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR, res.error
    assert "server_error mid-stream" in res.error.message and "Sorry about that" in res.error.message


async def test_gemini_response_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("gemini/generate_content.response.json"))
    res = await served_clients["gemini"].complete(req("gemini"))
    assert res.ok, res.error
    assert (
        res.text
        == load("gemini/generate_content.response.json")["candidates"][0]["content"]["parts"][0]["text"]
    )
    assert res.finish_reason == "stop" and res.model == MODELS["gemini"]  # no modelVersion: the requested one
    # cachedContentTokenCount is omitted when nothing was cached: zero, not a failure.
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (9, 87, 0)


async def test_gemini_cached_tokens_are_counted_within_the_prompt(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("gemini/generate_content_cached.response.json"))
    res = await served_clients["gemini"].complete(req("gemini"))
    assert (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens) == (323388, 397, 323383)


async def test_gemini_stream_is_normalised(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    serve(served, raw("gemini/stream.sse"))
    text, res = await streamed(served_clients["gemini"], "gemini")
    assert res.ok, res.error
    pieces = [
        data["candidates"][0]["content"]["parts"][0]["text"]
        for _, data in sse_events(raw("gemini/stream.sse"))
    ]
    assert text == res.text == "".join(pieces) and res.finish_reason == "stop"
    assert served.requests[0][0].endswith(":streamGenerateContent")


# OpenAI's documented rate-limit headers (its guide's sample values), and the same on a 429 whose
# spent limit is requests (remaining 0: ours). OpenAI documents no Retry-After; compatible servers
# send one, which wins.
OPENAI_LIMITS: dict[str, str] = load("openai/ratelimit_headers.json")
OPENAI_SPENT = {**OPENAI_LIMITS, "x-ratelimit-remaining-requests": "0"}
OPENAI_SPENT_BOTH = {**OPENAI_SPENT, "x-ratelimit-remaining-tokens": "0"}

ERRORS = [
    ("openai", "openai/error_401_invalid_api_key.json", 401, {}, ErrorKind.AUTH, None),
    ("openai", "openai/error_401_missing_key.json", 401, {}, ErrorKind.AUTH, None),
    ("openai", "openai/error_400_unsupported_parameter.json", 400, {}, ErrorKind.BAD_REQUEST, None),
    ("openai", "openai/error_429_rate_limit.json", 429, OPENAI_SPENT, ErrorKind.RATE_LIMITED, 1.0),
    # Both limits spent: the request needs both, so the later reset ("6m0s").
    ("openai", "openai/error_429_rate_limit.json", 429, OPENAI_SPENT_BOTH, ErrorKind.RATE_LIMITED, 360.0),
    # No limit spent: the resets say when each is back to full, nothing about this 429.
    ("openai", "openai/error_429_rate_limit.json", 429, OPENAI_LIMITS, ErrorKind.RATE_LIMITED, None),
    ("openai", "openai/error_429_rate_limit.json", 429, {"retry-after": "4"}, ErrorKind.RATE_LIMITED, 4.0),
    ("openai", "openai/error_500_server_error.json", 500, {}, ErrorKind.SERVER_ERROR, None),
    ("anthropic", "anthropic/error_401_invalid_key.json", 401, {}, ErrorKind.AUTH, None),
    ("anthropic", "anthropic/error_401_missing_key.json", 401, {}, ErrorKind.AUTH, None),
    ("anthropic", "anthropic/error_404_not_found.json", 404, {}, ErrorKind.BAD_REQUEST, None),
    (
        "anthropic",
        "anthropic/error_429_rate_limit.json",
        429,
        {"retry-after": "7"},
        ErrorKind.RATE_LIMITED,
        7.0,
    ),
    ("anthropic", "anthropic/error_529_overloaded.json", 529, {}, ErrorKind.SERVER_ERROR, None),
    # A wrong Gemini key is a 400, not a 401: only its ErrorInfo reason says it is about the key.
    ("gemini", "gemini/error_400_api_key_invalid.json", 400, {}, ErrorKind.AUTH, None),
    ("gemini", "gemini/error_403_unregistered_caller.json", 403, {}, ErrorKind.AUTH, None),
    # Gemini's wait is the RetryInfo in the body; it sends no Retry-After, so one is not read.
    ("gemini", "gemini/error_429_retry_info.json", 429, {}, ErrorKind.RATE_LIMITED, 53.0),
    ("gemini", "gemini/error_429_resource_exhausted.json", 429, {}, ErrorKind.RATE_LIMITED, None),
    (
        "gemini",
        "gemini/error_429_resource_exhausted.json",
        429,
        {"retry-after": "2"},
        ErrorKind.RATE_LIMITED,
        None,
    ),
    ("gemini", "gemini/error_503_unavailable.json", 503, {}, ErrorKind.SERVER_ERROR, None),
]


@pytest.mark.parametrize(("provider", "fixture", "status", "headers", "expected", "retry_after"), ERRORS)
@pytest.mark.parametrize("stream", [False, True])
async def test_reference_error_bodies_are_typed(
    served: FixtureServer,
    served_clients: dict[str, ProviderClient],
    provider: str,
    fixture: str,
    status: int,
    headers: dict[str, str],
    expected: ErrorKind,
    retry_after: float | None,
    stream: bool,
) -> None:
    serve(served, raw(fixture), status, **headers)
    client = served_clients[provider]
    res = (await streamed(client, provider))[1] if stream else await client.complete(req(provider))
    assert res.error is not None
    assert (res.error.kind, res.error.status_code, res.error.retry_after_s) == (expected, status, retry_after)
    body = load(fixture)["error"]
    assert body["message"][:25] in res.error.message  # the provider's own words reach the caller


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_429_without_retry_after_waits_for_the_spent_limits_reset(
    served: FixtureServer, served_clients: dict[str, ProviderClient], stream: bool
) -> None:
    """Anthropic's Rate limits page: each limit's ``-remaining`` and ``-reset`` (RFC 3339). A 429
    without ``retry-after`` waits for the reset of the limit at 0, not of one that has room."""
    now = datetime.now(UTC)
    at = {s: (now + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ") for s in (30, 90)}
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": at[30],
        "anthropic-ratelimit-tokens-limit": "40000",
        "anthropic-ratelimit-tokens-remaining": "39000",
        "anthropic-ratelimit-tokens-reset": at[90],
    }
    serve(served, raw("anthropic/error_429_rate_limit.json"), 429, **headers)
    client = served_clients["anthropic"]
    res = (await streamed(client, "anthropic"))[1] if stream else await client.complete(req("anthropic"))
    assert res.error is not None and res.error.retry_after_s is not None
    assert res.error.kind is ErrorKind.RATE_LIMITED and 28 <= res.error.retry_after_s <= 30


async def test_a_masked_key_echoed_by_the_api_never_reaches_our_errors(served: FixtureServer) -> None:
    # The reference 401 echoes "sk-proj-" + 20 stars + "abcd": what OpenAI shows of this key.
    key = "sk-proj-" + "Q7vX2mN9pL4kR8sT1wY6" + "abcd"
    serve(served, raw("openai/error_401_invalid_api_key.json"), 401)
    client = client_for("openai", served.url, key=key)
    try:
        res = await client.complete(req("openai"))
    finally:
        await client.aclose()
    assert res.error is not None and res.error.kind is ErrorKind.AUTH
    assert served.requests[0][1]["authorization"] == f"Bearer {key}"
    message = res.error.message
    assert "Incorrect API key provided: ***." in message
    for fragment in (key, key[:8], key[-4:], "****"):
        assert fragment not in message


# -- the simulator against reference bodies ------------------------------------------------------------

KEY = "sim-test-key"
OPENAI_AUTH = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC_AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GEMINI_AUTH = {"x-goog-api-key": KEY}
GEMINI_MODEL = "/v1beta/models/gemini-2.5-flash"
# The chat completion object example carries it; the create example (newer) does not. Deprecated.
FINGERPRINT = "$.system_fingerprint"


@pytest.fixture
def http(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        yield client


def test_simulator_openai_completion_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", json=load("openai/chat_completion.request.json"), headers=OPENAI_AUTH
    )
    assert r.status_code == 200
    assert_shape(load("openai/chat_completion.response.json"), r.json(), frozenset({FINGERPRINT}))
    assert_shape(load("openai/chat_completion_object.json"), r.json())


def chunk_kind(data: Any) -> str:
    if data == "[DONE]":
        return "done"
    if not data["choices"]:
        return "usage"
    choice = data["choices"][0]
    if choice["finish_reason"]:
        return "finish"
    return "role" if "role" in choice["delta"] else "content"


@pytest.mark.parametrize("name", ["chat_completion.stream", "chat_completion.stream_usage"])
def test_simulator_openai_stream_has_the_reference_shape(http: httpx.Client, name: str) -> None:
    r = http.post("/v1/chat/completions", json=load(f"openai/{name}.request.json"), headers=OPENAI_AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ref = [data for _, data in sse_events(raw(f"openai/{name}.sse"))]
    got = [data for _, data in sse_events(r.content)]
    assert collapse([chunk_kind(d) for d in got]) == [chunk_kind(d) for d in ref]
    by_kind = {chunk_kind(d): d for d in ref}
    # service_tier: in the chunk schema, not in the chunk example. The first delta's refusal: a
    # field of the delta schema (null unless the model refuses) that the 2023 example predates.
    # The usage chunk's usage is the caching guide's, which leaves out the audio and prediction
    # details the create example's usage shows (the completion shape test holds those).
    details = {
        "prompt_tokens_details.audio_tokens",
        "completion_tokens_details.audio_tokens",
        "completion_tokens_details.accepted_prediction_tokens",
        "completion_tokens_details.rejected_prediction_tokens",
    }
    optional = frozenset({"$.service_tier", "$.choices[].delta.refusal", *(f"$.usage.{d}" for d in details)})
    for data in got:
        if data != "[DONE]":
            assert_shape(by_kind[chunk_kind(data)], data, optional)


def test_simulator_openai_errors_have_the_reference_shape(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=load("openai/chat_completion.request.json"))
    assert r.status_code == 401 and r.json() == load("openai/error_401_missing_key.json")
    bad = {**load("openai/chat_completion.request.json"), "temperature": 3}
    r = http.post("/v1/chat/completions", json=bad, headers=OPENAI_AUTH)
    assert r.status_code == 400
    assert_shape(load("openai/error_400_unsupported_parameter.json"), r.json())


def test_simulator_openai_401_echoes_the_key_masked_as_openai_does(http: httpx.Client) -> None:
    key = "sim-invalid-key-" + "0123456789abcdef"
    auth = {"Authorization": f"Bearer {key}"}
    r = http.post("/v1/chat/completions", json=load("openai/chat_completion.request.json"), headers=auth)
    assert r.status_code == 401
    ref = load("openai/error_401_invalid_api_key.json")
    assert_shape(ref, r.json())
    masked = key[:8] + "*" * (len(key) - 12) + key[-4:]
    assert r.json()["error"]["message"] == ref["error"]["message"].replace(
        "sk-proj-********************abcd", masked
    )
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_simulator_anthropic_message_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=load("anthropic/message.request.json"), headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    # The create example shows only input/output tokens; the caching guide's usage shows the rest.
    usage = frozenset(f"$.usage.{k}" for k in r.json()["usage"] if k not in ("input_tokens", "output_tokens"))
    assert_shape(load("anthropic/message.response.json"), r.json(), usage)
    # service_tier: a field of the Usage object the caching guide's example does not show.
    assert_shape(
        load("anthropic/usage_prompt_caching.json")["usage"], r.json()["usage"], frozenset({"$.service_tier"})
    )


def test_simulator_anthropic_stream_has_the_reference_event_sequence(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=load("anthropic/stream.request.json"), headers=ANTHROPIC_AUTH)
    assert r.status_code == 200
    ref, got = sse_events(raw("anthropic/stream.sse")), sse_events(r.content)
    assert collapse([name or "" for name, _ in got]) == collapse([name or "" for name, _ in ref])
    assert all(name == data["type"] for name, data in got)
    by_name = {name: data for name, data in ref}
    for name, data in got:
        message_usage = frozenset(
            f"$.message.usage.{k}"
            for k in data.get("message", {}).get("usage", {})
            if k not in ("input_tokens", "output_tokens")
        )
        assert_shape(by_name[name], data, message_usage)


def test_simulator_anthropic_errors_have_the_reference_shape(http: httpx.Client) -> None:
    r = http.post(
        "/v1/messages",
        json=load("anthropic/message.request.json"),
        headers={"anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 401
    assert_shape(load("anthropic/error_404_not_found.json"), r.json())
    assert r.json()["error"] == load("anthropic/error_401_missing_key.json")["error"]
    wrong = {"x-api-key": "sim-invalid-key-0123456789abcdef", "anthropic-version": "2023-06-01"}
    r = http.post("/v1/messages", json=load("anthropic/message.request.json"), headers=wrong)
    assert r.status_code == 401 and r.json()["error"] == load("anthropic/error_401_invalid_key.json")["error"]
    assert r.json()["request_id"] == r.headers["request-id"]
    body = {k: v for k, v in load("anthropic/message.request.json").items() if k != "max_tokens"}
    r = http.post("/v1/messages", json=body, headers=ANTHROPIC_AUTH)
    assert r.status_code == 400
    assert_shape(load("anthropic/error_404_not_found.json"), r.json())


# Fields the GenerateContentResponse reference documents that the 2024 examples predate, and the
# per-candidate safety ratings those examples carried (the simulator rates nothing).
GEMINI_OPTIONAL = frozenset(
    {"$.modelVersion", "$.responseId", "$.usageMetadata.promptTokensDetails", "$.candidates[].safetyRatings"}
)


def test_simulator_gemini_response_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post(
        f"{GEMINI_MODEL}:generateContent",
        json=load("gemini/generate_content.request.json"),
        headers=GEMINI_AUTH,
    )
    assert r.status_code == 200
    assert_shape(load("gemini/generate_content.response.json"), r.json(), GEMINI_OPTIONAL)


def test_simulator_gemini_cached_usage_has_the_reference_shape(http: httpx.Client) -> None:
    body = {
        **load("gemini/generate_content.request.json"),
        "systemInstruction": {"parts": [{"text": "Be brief. " * 2000}]},
    }
    answers = [
        http.post(f"{GEMINI_MODEL}:generateContent", json=body, headers=GEMINI_AUTH).json() for _ in range(2)
    ]
    # Omitted while nothing is cached (as in the plain example), present once something is.
    assert "cachedContentTokenCount" not in answers[0]["usageMetadata"]
    assert_shape(load("gemini/generate_content.response.json"), answers[0], GEMINI_OPTIONAL)
    assert_shape(load("gemini/generate_content_cached.response.json"), answers[1], GEMINI_OPTIONAL)
    usage = answers[1]["usageMetadata"]
    assert 0 < usage["cachedContentTokenCount"] <= usage["promptTokenCount"]


def test_simulator_gemini_stream_has_the_reference_shape(http: httpx.Client) -> None:
    r = http.post(
        f"{GEMINI_MODEL}:streamGenerateContent?alt=sse",
        json=load("gemini/stream.request.json"),
        headers=GEMINI_AUTH,
    )
    assert (
        r.status_code == 200
        and r.content.endswith(b"\r\n\r\n")
        and b"\n\n" not in r.content.replace(b"\r\n", b"")
    )
    ref = [d for _, d in sse_events(raw("gemini/stream_captured.sse"))]
    got = [d for _, d in sse_events(r.content)]
    assert len(got) > 1
    # Held to a stream the API sent (gemini-2.5-flash, captured): every field of every chunk, the
    # usage so far on each (candidatesTokenCount growing), finishReason on the last only. The one
    # field left out is a thinking model's thoughtsTokenCount: the simulator's models do not think.
    thinking = frozenset({"$.usageMetadata.thoughtsTokenCount"})
    for data in got[:-1]:
        assert_shape(ref[0], data, thinking)
        assert "finishReason" not in data["candidates"][0]
    assert_shape(ref[-1], got[-1], thinking)
    counts = [d["usageMetadata"]["candidatesTokenCount"] for d in got]
    assert counts == sorted(counts) and counts[0] > 0
    assert len({d["responseId"] for d in got}) == 1


def test_simulator_gemini_auth_errors_are_the_apis_own(http: httpx.Client) -> None:
    request = load("gemini/generate_content.request.json")
    r = http.post(f"{GEMINI_MODEL}:generateContent", json=request)
    assert r.status_code == 403 and r.json() == load("gemini/error_403_unregistered_caller.json")
    r = http.post(
        f"{GEMINI_MODEL}:generateContent",
        json=request,
        headers={"x-goog-api-key": "sim-invalid-key-0123456789"},
    )
    assert r.status_code == 400 and r.json() == load("gemini/error_400_api_key_invalid.json")


@pytest.mark.parametrize(
    ("provider", "fault", "status", "fixture"),
    [
        ("openai", "error_429", 429, "openai/error_429_rate_limit.json"),
        ("openai", "error_500", 500, "openai/error_500_server_error.json"),
        ("anthropic", "error_429", 429, "anthropic/error_429_rate_limit.json"),
        ("anthropic", "error_503", 529, "anthropic/error_529_overloaded.json"),
        ("gemini", "error_429", 429, "gemini/error_429_retry_info.json"),
        ("gemini", "error_503", 503, "gemini/error_503_unavailable.json"),
    ],
)
def test_simulator_fault_errors_have_the_reference_shape(
    http: httpx.Client, provider: str, fault: str, status: int, fixture: str
) -> None:
    model = MODELS[provider]
    http.put(f"/admin/faults/{model}", json={fault: {"rate": 1.0}}).raise_for_status()
    if provider == "openai":
        r = http.post(
            "/v1/chat/completions",
            json={**load("openai/chat_completion.request.json"), "model": model},
            headers=OPENAI_AUTH,
        )
    elif provider == "anthropic":
        r = http.post(
            "/v1/messages",
            json={**load("anthropic/message.request.json"), "model": model},
            headers=ANTHROPIC_AUTH,
        )
    else:
        r = http.post(
            f"/v1beta/models/{model}:generateContent",
            json=load("gemini/generate_content.request.json"),
            headers=GEMINI_AUTH,
        )
    assert r.status_code == status
    # A 429's wait is only where the provider puts it: Anthropic's retry-after, OpenAI's rate-limit
    # headers (the guide's six, no Retry-After), Gemini's body (no header at all).
    limit_headers = {k for k in r.headers if k.startswith(("x-ratelimit-", "anthropic-ratelimit-"))}
    if fault != "error_429":
        assert "retry-after" not in r.headers and not limit_headers
    elif provider == "openai":
        assert "retry-after" not in r.headers and limit_headers == set(OPENAI_LIMITS)
        assert (r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-reset-requests"]) == (
            "0",
            "1s",
        )
    elif provider == "anthropic":
        assert r.headers["retry-after"] == "1" and r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    else:
        assert "retry-after" not in r.headers and not limit_headers
        assert r.json()["error"]["details"][-1]["retryDelay"] == "1s"
    ref = load(fixture)
    # request_id: in the Errors page's shape; the streaming guide's overload object has none.
    assert_shape(ref, r.json(), frozenset({"$.request_id"}) if "request_id" not in ref else frozenset())
