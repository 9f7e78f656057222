"""A broken connection is typed by what the HTTP stack saw, the same on every provider and whatever
the HTTP client under the SDK (``moa.providers.wire.connection_failure``): the OpenAI and
Anthropic clients run on aiohttp, whose SDK transport reports every broken connection as
``httpx.ConnectTimeout``, so typing by the SDK's wrapper made a refused connection a timeout,
retried as one and billed its prompt on every attempt. Also: a streamed event of another shape than
the provider's API sends is the provider's malformed response, never an internal failure of ours.

Each case is a real socket: a port nobody listens on, or a server of the test's own that answers
as far as the case says and closes."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from moa.providers.registry import ProviderPool
from moa.simulator.server import SimulatorServer
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind
from tests.helpers import simulated

PROVIDERS = [("openai", "gpt-4.1"), ("anthropic", "claude-haiku-4-5"), ("gemini", "gemini-2.5-flash")]
QUESTION = (ChatMessage(role="user", content="How do vaccines train the immune system?"),)


def pool_at(url: str) -> ProviderPool:
    """The bundled providers, every one pointed at ``url``."""
    config = simulated(cast(SimulatorServer, SimpleNamespace(url=url)))
    return ProviderPool.from_config(config, sim_url=url)


async def streamed(url: str, provider: str, model: str) -> CallResult:
    """One streamed call to ``provider`` at ``url``: its result (the stream's last event)."""
    async with pool_at(url) as pool:
        last: Any = None
        async for event in pool.clients[provider].stream(
            CallRequest(provider=provider, model=model, messages=QUESTION)
        ):
            last = event
    assert isinstance(last, CallResult)
    return last


class OneShotServer:
    """Accepts connections, reads a request, writes ``answer`` (maybe nothing), then closes: with
    ``reset``, abortively (a TCP reset, as a crashed peer or a middlebox cuts a connection)."""

    def __init__(self, answer: bytes, reset: bool = False) -> None:
        self.answer, self.reset = answer, reset
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                self.requests.append(conn.recv(65536))
                conn.sendall(self.answer)
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def refused_url() -> str:
    """A port on which nobody listens: connecting is refused."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def one_shot() -> Iterator[Callable[..., OneShotServer]]:
    """Makes ``OneShotServer``s for the test, closed after it."""
    made: list[OneShotServer] = []

    def make(answer: bytes, reset: bool = False) -> OneShotServer:
        made.append(server := OneShotServer(answer, reset))
        return server

    yield make
    for server in made:
        server.sock.close()


@pytest.mark.parametrize(("provider", "model"), PROVIDERS)
async def test_a_refused_connection_is_a_failed_connection_retried_and_never_billed(
    refused_url: str, provider: str, model: str
) -> None:
    result = await streamed(refused_url, provider, model)
    assert result.error is not None
    assert result.error.kind is ErrorKind.SERVER_ERROR, result.error
    assert result.error.message.startswith("connection failed: never connected"), result.error
    # A server error is retried (the default policy: three attempts), and nothing reached the
    # provider, so no attempt is billed: not the prompt, not once.
    assert result.attempts == 3
    assert result.usage.input_tokens == 0 and result.cost_usd == 0.0


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize(("provider", "model"), PROVIDERS)
async def test_a_connection_broken_after_the_answer_began_is_a_stream_cut_mid_way(
    one_shot: Any, provider: str, model: str, reset: bool
) -> None:
    """The 200's head and the start of a chunked body, then the connection is closed or reset:
    the provider's broken stream, not a timeout (what the aiohttp transport's wrapper says of a
    reset) and not ours."""
    server = one_shot(STREAM_HEAD + b"6\r\n: ping\n\r\n", reset)
    result = await streamed(server.url, provider, model)
    assert result.error is not None
    assert result.error.kind is ErrorKind.MALFORMED_RESPONSE, result.error
    assert result.error.message.startswith("stream cut mid-way"), result.error


def event_stream(body: bytes) -> bytes:
    """A whole 200 answer whose body is ``body``, an event stream of known length."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)
    return head + body


def sse_body(*events: bytes) -> bytes:
    return event_stream(b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    "event",
    [b"5", b'"text"', b"[1, 2]", b'{"choices": 5}', b'{"choices": [5]}', b'{"choices": [{"delta": "x"}]}'],
)
async def test_an_openai_event_that_is_not_a_chunk_is_the_providers_malformed_response(
    one_shot: Any, event: bytes
) -> None:
    server = one_shot(sse_body(event))
    result = await streamed(server.url, "openai", "gpt-4.1")
    assert result.error is not None
    assert result.error.kind is ErrorKind.MALFORMED_RESPONSE, result.error


@pytest.mark.parametrize(("provider", "model"), PROVIDERS)
async def test_a_proxy_named_in_the_environment_carries_the_calls(
    one_shot: Any, provider: str, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured by every provider's client (the OpenAI and Anthropic clients on
    aiohttp included): the call goes to the proxy, asking for the provider's URL."""
    proxy = one_shot(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    # What else this process sends over HTTP (a span exporter to a local receiver) goes direct.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("no_proxy", raising=False)
    result = await streamed("http://provider.invalid", provider, model)
    assert result.error is not None  # the proxy answered 503
    asked = [r.split(b" ")[1] for r in proxy.requests]
    calls = [url for url in asked if url.startswith(b"http://provider.invalid/")]
    assert calls, f"no call reached the proxy: {asked}"


def anthropic_body(*events: tuple[bytes, bytes]) -> bytes:
    return event_stream(b"".join(b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in events))


MESSAGE_START = (
    b"message_start",
    b'{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", '
    b'"model": "claude-haiku-4-5", "content": [], "usage": {"input_tokens": 5, "output_tokens": 1}}}',
)
TEXT_START = (b"content_block_start", b'{"type": "content_block_start", "index": 0, "content_block": 7}')


@pytest.mark.parametrize(
    "events",
    [
        [(b"message_start", b"5")],
        [(b"message_start", b'{"type": "message_start", "message": 5}')],
        [(b"message_start", b'{"type": "message_start", "message": {"usage": "x"}}')],
        [MESSAGE_START, TEXT_START],
        [
            MESSAGE_START,
            (b"content_block_delta", b'{"type": "content_block_delta", "index": 0, "delta": "x"}'),
        ],
        [
            MESSAGE_START,
            (
                b"content_block_delta",
                b'{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}}',
            ),
        ],
        [MESSAGE_START, (b"message_delta", b'{"type": "message_delta", "delta": {}, "usage": "x"}')],
    ],
    ids=["not-an-object", "message", "usage", "content-block", "delta", "text", "delta-usage"],
)
async def test_an_anthropic_event_of_another_shape_is_the_providers_malformed_response(
    one_shot: Any, events: list[tuple[bytes, bytes]]
) -> None:
    server = one_shot(anthropic_body(*events))
    result = await streamed(server.url, "anthropic", "claude-haiku-4-5")
    assert result.error is not None
    assert result.error.kind is ErrorKind.MALFORMED_RESPONSE, result.error


@pytest.mark.parametrize(
    "data",
    [b"5", b'{"candidates": 5}', b'{"candidates": [{"content": 5}]}'],
    ids=["not-an-object", "candidates", "content"],
)
async def test_a_gemini_chunk_the_sdk_cannot_read_is_the_providers_malformed_response(
    one_shot: Any, data: bytes
) -> None:
    """google-genai meets some bodies that are not the API's with a TypeError of its own while
    reading the stream: typed as the provider's malformed response, not as ours."""
    server = one_shot(event_stream(b"data: " + data + b"\r\n\r\n"))
    result = await streamed(server.url, "gemini", "gemini-2.5-flash")
    assert result.error is not None
    assert result.error.kind is ErrorKind.MALFORMED_RESPONSE, result.error
