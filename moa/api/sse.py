"""A chat completion's stream as server-sent events, in OpenAI's chunk format: the role chunk,
the answer's chunks, keep-alive comments while nothing is sent, ``moa.progress`` chunks when asked
for, the final usage and detail, and an error event when the stream fails after its headers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moa.api.drain import Drain
from moa.api.outcomes import Outcomes
from moa.api.responses import answered_model, finish_reason, moa_detail, usage
from moa.api.schemas import ChatCompletionRequest, error_body
from moa.api.streaming import IDLE, EventPump
from moa.errors import MoAError
from moa.result import MoAResult, Progress
from moa.types import TextDelta, ToolCall
from moa_observability.asgi import stream_failed


class Chunks:
    """One response's ``chat.completion.chunk`` events, all with its id, time and model."""

    def __init__(self, model: str) -> None:
        self.ident, self.created, self.model = (
            f"chatcmpl-moa-{uuid.uuid4().hex[:24]}",
            int(time.time()),
            model,
        )

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def delta(self, delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
        """A chunk of choice ``index``'s answer (each of ``n`` answers streams under its own)."""
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return event(self._head() | {"system_fingerprint": None, "choices": choices})

    def calls(self, calls: Sequence[ToolCall], legacy: bool = False) -> list[bytes]:
        """A decided answer's calls, as OpenAI streams them: per call, a chunk with its ``index``,
        ``id``, type and name and empty arguments, then its arguments in fragments (a legacy
        ``functions`` request: ``function_call`` with its name, then its arguments)."""
        out = []
        for index, call in enumerate(calls[:1] if legacy else calls):
            if legacy:
                out.append(self.delta({"function_call": {"name": call.name, "arguments": ""}}))
                out.extend(
                    self.delta({"function_call": {"arguments": piece}}) for piece in fragments(call.arguments)
                )
                continue
            head = {"index": index, "id": call.id, "type": "function"}
            head["function"] = {"name": call.name, "arguments": ""}
            out.append(self.delta({"tool_calls": [head]}))
            out.extend(
                self.delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                for piece in fragments(call.arguments)
            )
        return out

    def progress(self, p: Progress) -> bytes:
        moa = {"progress": p.model_dump()}
        return event(self._head() | {"system_fingerprint": None, "choices": [], "moa": moa})

    def last(self, result: MoAResult, include_usage: bool, detail: bool) -> bytes | None:
        """The chunk after the finish: the usage (``stream_options.include_usage``) and the
        ``moa`` detail, when either was asked for."""
        extra: dict[str, Any] = {"moa": moa_detail(result)} if detail else {}
        if not (include_usage or extra):
            return None
        body = {"choices": [], "usage": usage(result.usage) if include_usage else None, **extra}
        return event(self._head() | body)


# How many characters of a call's arguments one streamed fragment carries (OpenAI's own fragments
# are a token or a few; a client assembles them whatever their size).
ARGUMENT_FRAGMENT_CHARS = 32


def fragments(arguments: str) -> list[str]:
    step = ARGUMENT_FRAGMENT_CHARS
    return [arguments[i : i + step] for i in range(0, len(arguments), step)]


def event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class SseWriter:
    """Writes each streamed chat completion's bytes; reports its end to ``outcomes``, and takes
    its events off the drain's list when it ends."""

    def __init__(self, keepalive_s: float, outcomes: Outcomes, drain: Drain) -> None:
        self.keepalive_s, self.outcomes, self.drain = keepalive_s, outcomes, drain

    async def write(
        self,
        req: ChatCompletionRequest,
        first: TextDelta | MoAResult | Progress,
        events: EventPump,
        t0: float,
        ran: str | None = None,
    ) -> AsyncIterator[bytes]:
        """The response's SSE bytes: the role chunk at once, then the answer's chunks. While there
        is nothing to send (the proposers at work), a comment line every ``server.sse_keepalive_s``
        keeps proxies from taking the connection for idle; with ``moa.progress`` the client also
        gets a chunk with no choices and a ``moa.progress`` field at each step. An error after the
        headers went out ends the stream with an OpenAI-style error event and [DONE]."""
        chunks = Chunks(answered_model(req.model, ran))
        for index in range(req.n):
            yield chunks.delta({"role": "assistant", "content": ""}, index=index)
        ev: TextDelta | MoAResult | Progress | None = first
        stage = "admitted"
        first_token = False
        try:
            while ev is not None:
                if ev is IDLE:
                    yield f": keep-alive ({stage})\n\n".encode()
                elif isinstance(ev, Progress):
                    stage = ev.describe()
                    if req.moa.progress:
                        yield chunks.progress(ev)
                elif isinstance(ev, TextDelta):
                    if ev.text and not first_token:
                        first_token = True
                        self.outcomes.first_token(ran or req.model, time.monotonic() - t0)
                    yield chunks.delta({"content": ev.text}, index=ev.choice)
                else:
                    self.outcomes.answered(ev, ev.wall_time_s, req.chat_messages(), req.model)
                    legacy = req.functions is not None
                    for choice in ev.answers():  # each answer ends with its own finish reason
                        if choice.refusal is not None:  # as OpenAI streams a refusal: delta.refusal
                            yield chunks.delta({"refusal": choice.refusal}, index=choice.index)
                        for piece in chunks.calls(choice.tool_calls, legacy=legacy):
                            yield piece
                        yield chunks.delta({}, finish_reason(choice.finish_reason, legacy), choice.index)
                    include_usage = req.stream_options is not None and req.stream_options.include_usage
                    last = chunks.last(ev, include_usage, req.moa.detail)
                    if last is not None:
                        yield last
                ev = await events.next(self.keepalive_s)
        except MoAError as e:
            # Text may already be out: the error travels in the stream, as OpenAI's API does. The
            # request is counted and logged with the error's status, not the 200 of its headers.
            self.outcomes.failed(req.model, e, time.monotonic() - t0)
            stream_failed(e.status_code)
            yield event(error_body(e.message, e.error_type, e.code))
        finally:
            self.drain.streams.discard(events)
        yield b"data: [DONE]\n\n"
