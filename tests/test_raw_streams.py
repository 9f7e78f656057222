"""The OpenAI and Anthropic adapters read their streams off the SDKs' raw streaming responses
(``with_streaming_response``), each event's data as plain JSON, not a pydantic object each
(``moa.providers.sse``). They must read exactly what the SDKs' own streams read: the same events
out of the same bytes, and the same exception where the SDK's stream raises one (an error inside
a 200 stream, data that is not JSON). Each body here is served over HTTP and read both ways, the
SDK's stream being the reference; the adapters' results on the providers' reference bodies are
tests/test_fidelity.py's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import openai
import pytest

from moa.providers.anthropic_client import _events
from moa.providers.openai_client import _chunks
from moa.providers.sse import sse_events
from tests.test_fidelity import FixtureServer, raw, serve

# -- the event stream's rules, whatever the reads ------------------------------------------------------

# Every line ending (LF, CRLF, CR), a CRLF and a CR ending one line each, comments, an id and a
# retry (each dispatches an event of its own, even without data), data over several lines and a
# "data" field without a colon, an empty event name (no name), a field the rules do not know, and
# a last line left unterminated (never dispatched).
TRICKY = (
    b": a comment\n"
    b"event: first\r\n"
    b"data: a\r"
    b"data:b\n"
    b"\n"
    b"data\r\n"
    b"unknown: field\n"
    b"\r"
    b"event:\n"
    b"data:  two spaces\n"
    b"\n"
    b"retry: 10\n"
    b"\n"
    b"retry: soon\n"
    b"\n"
    b"id: 7\n"
    b"\n"
    b"\n"
    b"data: tail"
)
EXPECTED = [
    ("first", "a\nb"),
    (None, ""),
    (None, " two spaces"),
    (None, ""),  # the retry
    (None, ""),  # the id
    (None, ""),  # the id again: it is never reset, so every blank line dispatches from now on
]


async def _read(pieces: list[bytes]) -> list[tuple[str | None, str]]:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return [event async for event in sse_events(chunks())]


def _splits(body: bytes) -> Iterator[list[bytes]]:
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    for i in range(1, len(body)):
        yield [body[:i], b"", body[i:]]


async def test_events_are_cut_by_the_rules_wherever_the_reads_end() -> None:
    for pieces in _splits(TRICKY):
        assert await _read(pieces) == EXPECTED, pieces


async def test_an_lf_after_a_cr_ending_a_read_ends_no_line() -> None:
    # A CRLF cut between two reads is one line end; read as two, the blank line between would
    # dispatch "a" alone.
    assert await _read([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [(None, "a\nb")]


async def test_bytes_that_are_not_utf8_fail_as_in_the_sdks() -> None:
    for body in (b"data: \xff\n\n", b"data: ok\n\ndata: \xff"):
        with pytest.raises(UnicodeDecodeError):
            await _read([body])


# -- OpenAI: the SDK's stream against the raw reading ----------------------------------------------------

CHUNK = raw("openai/chat_completion.stream.sse").split(b"\n\n")[1] + b"\n\n"
OPENAI_BODIES = {
    "the reference stream": raw("openai/chat_completion.stream.sse"),
    "the usage chunk": raw("openai/chat_completion.stream_usage.sse"),
    "tool calls": raw("openai/chat_completion_tools.stream.sse"),
    "a refusal": raw("openai/chat_completion_parse_refusal.stream.sse"),
    "an error after a chunk": CHUNK
    + b'data: {"error": {"message": "The server had an error", "type": "server_error"}}\n\n',
    "an error without a message": CHUNK + b'data: {"error": {"type": "server_error"}}\n\n',
    "an error that is a string": b'data: {"error": "overloaded"}\n\n',
    "an error that is empty (not one)": CHUNK + b'data: {"error": null}\n\n' + b"data: [DONE]\n\n",
    "data that is not JSON": CHUNK + b"data: {'not': json}\n\n",
    "events after [DONE]": CHUNK + b"data: [DONE]\n\ndata: {'never': 'read'}\n\n",
    "no [DONE]": CHUNK,
    "a named event": b"event: delta\n" + CHUNK,
}


async def _gave(reading: AsyncIterator[Any]) -> tuple[list[Any], Any]:
    """What a reading gave: its items, and the exception it ended with (type, message, body)."""
    items: list[Any] = []
    try:
        async for item in reading:
            items.append(item)
    except Exception as exc:
        return items, (type(exc), str(exc), getattr(exc, "body", None), getattr(exc, "status_code", None))
    return items, None


async def _openai_sdk(client: openai.AsyncOpenAI) -> AsyncIterator[Any]:
    stream = await client.chat.completions.create(model="m", messages=[], stream=True)
    async for chunk in stream:
        yield chunk.to_dict()


async def _openai_raw(client: openai.AsyncOpenAI) -> AsyncIterator[Any]:
    opened = client.chat.completions.with_streaming_response.create(model="m", messages=[], stream=True)
    async with opened as response:
        async for chunk in _chunks(response):
            yield chunk


@pytest.mark.parametrize("body", list(OPENAI_BODIES))
async def test_openai_raw_chunks_are_the_sdk_streams(served: FixtureServer, body: str) -> None:
    serve(served, OPENAI_BODIES[body])
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="sk-test", max_retries=0) as client:
        reference = await _gave(_openai_sdk(client))
        assert await _gave(_openai_raw(client)) == reference
    chunks, failure = reference
    if "error" in body and "not one" not in body:  # the bodies do say what the test says
        assert failure is not None and failure[0] is openai.APIError
    elif "JSON" in body:
        assert failure is not None and failure[0] is json.JSONDecodeError
    else:
        assert failure is None and chunks


# -- Anthropic: the SDK's stream against the raw reading -------------------------------------------------

STREAM = raw("anthropic/stream.sse")
START = STREAM.split(b"event: content_block_start")[0]
ANTHROPIC_BODIES = {
    "the reference stream": STREAM,
    "tool use": raw("anthropic/tool_use.stream.sse"),
    "tool input that is not JSON": raw("anthropic/tool_use_invalid_json.stream.sse"),
    "an error event": START + raw("anthropic/stream_error.sse"),
    "an error event whose data is not JSON": START + b"event: error\ndata: overloaded\n\n",
    "an error event without data": START + b"event: error\ndata:\n\n",
    "pings, nameless and empty events": b"event: ping\ndata: {}\n\ndata: {}\n\nevent: x\ndata:\n\n" + STREAM,
    "data that is not JSON": START + b"event: message_delta\ndata: {'not': json}\n\n",
}


async def _anthropic_sdk(client: anthropic.AsyncAnthropic) -> AsyncIterator[Any]:
    stream = await client.messages.create(model="m", max_tokens=5, messages=[], stream=True)
    async for event in stream:
        yield event.to_dict()


async def _anthropic_raw(client: anthropic.AsyncAnthropic) -> AsyncIterator[Any]:
    opened = client.messages.with_streaming_response.create(model="m", max_tokens=5, messages=[], stream=True)
    async with opened as response:
        async for event in _events(response):
            yield event


@pytest.mark.parametrize("body", list(ANTHROPIC_BODIES))
async def test_anthropic_raw_events_are_the_sdk_streams(served: FixtureServer, body: str) -> None:
    serve(served, ANTHROPIC_BODIES[body])
    client = anthropic.AsyncAnthropic(base_url=served.url, api_key="sk-ant-test", max_retries=0)
    async with client:
        reference = await _gave(_anthropic_sdk(client))
        assert await _gave(_anthropic_raw(client)) == reference
    events, failure = reference
    if "error" in body:
        assert failure is not None and failure[0] is anthropic.APIStatusError and failure[3] == 200
    elif "data that is not JSON" in body:
        assert failure is not None and failure[0] is json.JSONDecodeError
    else:
        assert failure is None and events
