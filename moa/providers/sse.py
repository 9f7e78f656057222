"""Server-sent events read off an official SDK's raw streamed response, as plain strings.

Every call the engine makes is streamed (so that a call cut at its deadline is billed for what it
wrote), and the SDKs' own streams build a pydantic object for every chunk: most of a streamed
call's CPU (docs/BENCHMARKS.md, "Where the CPU goes"). An adapter therefore opens its stream with
the SDK's documented raw streaming response (``with_streaming_response``), which keeps the SDK
for the request (its body, auth, headers, timeouts) and for a refusal's typed status error, and
reads the events here, each event's data then parsed with ``json.loads`` alone.

The events are cut as the SDKs' own decoders cut them (the WHATWG event-stream rules): lines end
at CR, LF or CRLF (a CRLF split across two reads is one line end); a blank line dispatches an event
when it has a name, data or a retry, or once an id was set (an event never resets the last id);
data lines join with LF; a field's value loses one leading space; comments and unknown fields are
skipped; what is left unterminated at the end of the body is decoded but dispatches nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

__all__ = ["sse_events"]


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncGenerator[tuple[str | None, str], None]:
    """Each event of an SSE body read in ``chunks``: its name (None without one) and its data."""
    event: str | None = None
    data: list[str] = []
    retry, last_id = False, ""
    pending = b""  # the start of a line whose end is in a later read
    skip_lf = False  # the last read ended in CR: an LF starting the next one ends no line
    async for chunk in chunks:
        if not chunk:  # an empty read changes nothing (a CR before it still awaits its LF)
            continue
        if skip_lf:
            skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if pending:
            chunk = pending + chunk
        lines = chunk.splitlines(keepends=True)
        if not lines:
            continue
        last = lines[-1]
        if last.endswith(b"\n"):
            pending = b""
        elif last.endswith(b"\r"):
            pending, skip_lf = b"", True
        else:
            pending = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r\n").decode("utf-8")
            if not line:
                if event or data or retry or last_id:
                    yield event or None, "\n".join(data)
                    event, data, retry = None, [], False
                continue
            if line.startswith("data:"):  # nearly every line: read at once
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
                continue
            if line.startswith(":"):  # a comment
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":  # "data" without a colon: an empty data line
                data.append(value)
            elif name == "id" and "\0" not in value:
                last_id = value  # never reset by an event, as the rules say
            elif name == "retry":
                retry = retry or _is_int(value)
    if pending:
        # The body's last line, unterminated: decoded, as the SDKs decode it (bytes that are not
        # UTF-8 fail the same way), but no blank line follows it, so it dispatches nothing.
        pending.rstrip(b"\r\n").decode("utf-8")


def _is_int(value: str) -> bool:
    """Whether ``int()`` takes ``value`` (the SDKs keep a ``retry`` field only then)."""
    try:
        int(value)
    except ValueError:
        return False
    return True
