"""``ScriptedCaller``: a ``ModelCaller`` that answers from a script, for deterministic engine tests.

httpx ships ``MockTransport`` at its transport seam; this is the same idea at the engine's seam
(``moa.caller.ModelCaller``). The engine cannot tell it from the provider pool or the Ray
handles, so a test can drive quorum, grace, early stop and the fallback chain exactly: every
reply is scripted per model, failures carry a real ``ErrorKind``, and a reply may wait on an
``asyncio.Event`` or on a virtual step (``advance``) instead of a wall-clock sleep, so the order
of events is a fact of the test, not a race against the machine's load.

The end-to-end tests stay where they are (official SDKs over HTTP against the provider
simulator); this double covers the engine's decisions, where timing must be controlled.

Example::

    caller = ScriptedCaller(default="fine")
    caller.script("openai/gpt-4.1", Reply(text="the synthesis"))
    caller.script("anthropic/claude-haiku-4-5", Reply(error=ErrorKind.SERVER_ERROR))
    gate = caller.hold("gemini/gemini-2.5-flash")  # answers only once gate.set()
    engine = assemble(config, caller)  # moa.engine.assembly
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moa.types import CallError, CallRequest, CallResult, ErrorKind, StreamEvent, TextDelta, ToolCall, Usage

__all__ = ["Reply", "ScriptedCall", "ScriptedCaller"]

_WORD = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class Reply:
    """One scripted answer (or failure) of a model.

    ``after`` and ``at_step`` delay it: the call waits for the event to be set, or for the caller's
    virtual clock (``ScriptedCaller.advance``) to reach the step. ``deltas`` are the pieces a
    streamed call sends (default: the text in words); with ``error`` and ``fail_after`` pieces
    sent, the stream breaks mid-answer. ``pauses`` hold a streamed answer mid-way: each
    ``(pieces, step)`` waits, once ``pieces`` pieces are out, for the virtual clock to reach
    ``step`` (a layer still writing while the stage after it starts on its prefix).
    """

    text: str = "ok"
    error: ErrorKind | None = None
    message: str = "scripted failure"
    retry_after_s: float | None = None
    after: asyncio.Event | None = None
    at_step: int | None = None
    deltas: tuple[str, ...] | None = None
    fail_after: int = 0
    pauses: tuple[tuple[int, int], ...] = ()
    output_tokens: int | None = None
    finish_reason: str = "stop"
    # The function calls the model makes (its finish reason is then ``tool_calls``).
    tool_calls: tuple[ToolCall, ...] = ()
    # The model refuses the requested format, in these words (``CallResult.refusal``; no text).
    refusal: str | None = None

    @property
    def answer(self) -> str:
        """The whole answer: the deltas joined when they are scripted, else ``text``."""
        return "".join(self.deltas) if self.deltas is not None else self.text

    def pieces(self) -> tuple[str, ...]:
        if self.deltas is not None:
            return self.deltas
        return tuple(_WORD.findall(self.text)) or (self.text,)


@dataclass
class ScriptedCall:
    """One call the caller received, what it answered, and whether the engine cancelled it."""

    request: CallRequest
    streamed: bool
    reply: Reply
    started_step: int
    started_at: float = field(default_factory=time.monotonic)
    result: CallResult | None = None
    cancelled: bool = False

    @property
    def key(self) -> str:
        return f"{self.request.provider}/{self.request.model}"

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass
class ScriptedCaller:
    """Answers every ``CallRequest`` from a per-model script; records each call it received.

    Scripts are keyed ``"provider/model"`` (or a bare model name, matched when no full key is).
    A model scripted with several replies gives them in order and then repeats the last one. A
    model with no script answers ``default`` (``None``: a ``BAD_REQUEST`` failure, so an
    unexpected call is visible in the result rather than silently answered).
    """

    default: str | None = "ok"
    provider_kind: str = "scripted"
    calls: list[ScriptedCall] = field(default_factory=list, init=False)
    _scripts: dict[str, list[Reply]] = field(default_factory=dict, init=False, repr=False)
    _step: int = field(default=0, init=False)
    _changed: asyncio.Condition | None = field(default=None, init=False, repr=False)

    # -- scripting --------------------------------------------------------------------------------

    def script(self, key: str, *replies: Reply | str) -> ScriptedCaller:
        """Set what ``key`` answers, in order (a ``str`` is a plain successful answer)."""
        if not replies:
            raise ValueError("script at least one reply")
        self._scripts[key] = [Reply(text=r) if isinstance(r, str) else r for r in replies]
        return self

    def fail(self, key: str, kind: ErrorKind, message: str = "scripted failure") -> ScriptedCaller:
        """``key`` fails with ``kind`` on every call."""
        return self.script(key, Reply(error=kind, message=message))

    def hold(self, key: str, text: str = "ok", error: ErrorKind | None = None) -> asyncio.Event:
        """``key`` answers only once the returned event is set (cancelled calls never answer)."""
        gate = asyncio.Event()
        self.script(key, Reply(text=text, error=error, after=gate))
        return gate

    # -- the virtual clock ------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    async def advance(self, steps: int = 1) -> None:
        """Move the virtual clock on, one step at a time; calls waiting for a step up to it answer.

        After each step it yields to the event loop a few times, so the released calls' results
        usually reach the engine before the next step. A test should still assert on what it can
        wait for (``wait_started``, the run's result) rather than on how far the engine got.
        """
        for _ in range(steps):
            self._step += 1
            async with self._condition():
                self._condition().notify_all()
            for _ in range(20):  # the released call, its task's completion, the engine's wake-up
                await asyncio.sleep(0)

    async def wait_started(self, count: int) -> None:
        """Wait until ``count`` calls in all have started (event-driven, no polling of a clock)."""
        async with self._condition():
            await self._condition().wait_for(lambda: len(self.calls) >= count)

    # -- what happened ----------------------------------------------------------------------------

    def calls_to(self, key: str) -> list[ScriptedCall]:
        return [c for c in self.calls if key in (c.key, c.request.model)]

    @property
    def cancelled(self) -> list[str]:
        """The models whose calls the engine cancelled (stragglers), in call order."""
        return [c.key for c in self.calls if c.cancelled]

    # -- ModelCaller ------------------------------------------------------------------------------

    async def call(self, req: CallRequest) -> CallResult:
        rec = await self._begin(req, streamed=False)
        try:
            await self._wait(rec.reply)
            for _, step in rec.reply.pauses:  # a whole answer comes once its last piece would
                await self._until_step(step)
        except asyncio.CancelledError:
            rec.cancelled = True
            raise
        rec.result = self._result(req, rec, rec.reply.answer, streamed=False)
        await self._notify()
        return rec.result

    async def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        rec = await self._begin(req, streamed=True)
        reply = rec.reply
        sent = ""
        try:
            await self._wait(reply)
            pieces = reply.pieces()
            if reply.error is not None:
                pieces = pieces[: reply.fail_after]
            pauses = dict(reply.pauses)
            for n, piece in enumerate(pieces):
                if n in pauses:
                    await self._until_step(pauses[n])
                sent += piece
                yield TextDelta(text=piece)
                await asyncio.sleep(0)  # let the consumer run between pieces, as a network would
        except (asyncio.CancelledError, GeneratorExit):
            rec.cancelled = True
            raise
        rec.result = self._result(req, rec, sent if reply.error is not None else reply.answer, streamed=True)
        await self._notify()
        yield rec.result

    # -- internals --------------------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on the loop that uses it
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def _begin(self, req: CallRequest, *, streamed: bool) -> ScriptedCall:
        rec = ScriptedCall(
            request=req, streamed=streamed, reply=self._next_reply(req), started_step=self._step
        )
        self.calls.append(rec)
        await self._notify()
        return rec

    def _next_reply(self, req: CallRequest) -> Reply:
        replies = self._scripts.get(f"{req.provider}/{req.model}") or self._scripts.get(req.model)
        if replies is None:
            if self.default is None:
                return Reply(error=ErrorKind.BAD_REQUEST, message=f"no script for {req.provider}/{req.model}")
            return Reply(text=self.default)
        return replies.pop(0) if len(replies) > 1 else replies[0]

    async def _wait(self, reply: Reply) -> None:
        if reply.after is not None:
            await reply.after.wait()
        if reply.at_step is not None:
            await self._until_step(reply.at_step)

    async def _until_step(self, step: int) -> None:
        async with self._condition():
            await self._condition().wait_for(lambda: self._step >= step)

    def _result(self, req: CallRequest, rec: ScriptedCall, text: str, *, streamed: bool) -> CallResult:
        reply = rec.reply
        error = None
        if reply.error is not None:
            error = CallError(kind=reply.error, message=reply.message, retry_after_s=reply.retry_after_s)
        input_tokens = sum(len(m.content.split()) for m in req.messages)
        output = reply.output_tokens if reply.output_tokens is not None else len(text.split())
        return CallResult(
            provider=req.provider,
            provider_kind=self.provider_kind,
            requested_model=req.model,
            model=req.model,
            text="" if error is not None and not streamed else text,
            usage=Usage(input_tokens=input_tokens, output_tokens=output if error is None else 0),
            finish_reason=None
            if error is not None
            else "tool_calls"
            if reply.tool_calls
            else reply.finish_reason,
            tool_calls=[] if error is not None else list(reply.tool_calls),
            refusal=None if error is not None else reply.refusal,
            latency_s=time.monotonic() - rec.started_at,
            attempts=1,
            streamed=streamed,
            error=error,
        )
