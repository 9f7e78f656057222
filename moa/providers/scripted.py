"""``ScriptedTransport``: a provider transport that plays a script, for tests of the policy.

httpx ships ``MockTransport`` at its transport seam; this is the same idea at the provider seam
(``moa.providers.transport.Transport``), below the policy (``ProviderClient``: breaker, slot,
rate budget, retries, learned refusals, cost). Each attempt plays the next ``Step``: after its
wait, a reply (its text, or the pieces a stream sends) or an exception (an ``AttemptError`` as a
provider's typed refusal, anything else as an SDK would raise it); a stream raises after its
pieces, so it breaks mid-answer. Once the script is spent its last step repeats. The SDK adapters
stay proven over the wire against the provider simulator; this double tests the policy alone.

Example::

    hint = AttemptError(ErrorKind.RATE_LIMITED, "429", status=429, retry_after_s=0.2)
    transport = ScriptedTransport(Step(error=hint), "fine")
    client = ProviderClient("p", cfg, endpoint, transport)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moa.providers.transport import Attempt, AttemptError, Transport
from moa.providers.wire import classify_common, refused_param, unexpected_failure
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import CallRequest, Usage, prompt_texts

__all__ = ["ScriptedTransport", "Step"]

# How the script's refusals name a parameter (OpenAI's words): "Unsupported parameter: 'seed'".
REFUSED = re.compile(r"Unsupported parameter: '(\w+)'")


@dataclass(frozen=True)
class Step:
    """One attempt's part: wait ``delay_s`` (and for ``until``, if given), then answer ``text``
    (streamed as ``pieces``, default the text in one piece) or raise ``error`` (in a stream, after
    ``pieces``, default none). ``usage`` defaults to an estimate of the prompt and the text. A
    stream with ``stall_after`` stops after that many pieces and waits until it is closed (a
    provider that stops mid-way with the connection open)."""

    text: str = "ok"
    pieces: tuple[str, ...] | None = None
    error: BaseException | None = None
    delay_s: float = 0.0
    until: asyncio.Event | None = None
    usage: Usage | None = None
    finish_reason: str = "stop"
    service_s: float | None = None
    stall_after: int | None = None


class ScriptedTransport(Transport):
    """Plays ``script`` (steps, or a text for a reply, or an exception for a failure) attempt by
    attempt; ``sent`` records each attempt's request and timeout, ``streams_closed`` the streams
    the policy closed, ``window`` is the context window the "server" reports."""

    kind = "scripted"

    def __init__(self, *script: Step | str | BaseException, window: int | None = None) -> None:
        steps = [
            s if isinstance(s, Step) else Step(text=s) if isinstance(s, str) else Step(error=s)
            for s in script
        ]
        self.script = steps or [Step()]
        self.window = window
        self.sent: list[tuple[CallRequest, float]] = []
        self.streams_closed = 0
        self._new_attempt = asyncio.Event()

    async def wait_sent(self, count: int) -> None:
        """Until ``count`` attempts have been sent (to act while calls are held mid-way)."""
        while len(self.sent) < count:
            self._new_attempt.clear()
            await self._new_attempt.wait()

    async def _next(self, req: CallRequest, timeout_s: float) -> Step:
        self.sent.append((req, timeout_s))
        self._new_attempt.set()
        step = self.script[min(len(self.sent), len(self.script)) - 1]
        await asyncio.sleep(step.delay_s)
        if step.until is not None:
            await step.until.wait()
        return step

    async def send(self, req: CallRequest, timeout_s: float) -> Attempt:
        step = await self._next(req, timeout_s)
        if step.error is not None:
            raise step.error
        return _attempt(step, req, step.text)

    async def open_stream(self, req: CallRequest, timeout_s: float) -> AsyncIterator[str | Attempt]:
        step = await self._next(req, timeout_s)
        pieces = step.pieces if step.pieces is not None else () if step.error else (step.text,)
        try:
            for i, piece in enumerate(pieces):
                if i == step.stall_after:
                    await asyncio.Event().wait()  # only closing the stream ends this
                yield piece
            if step.stall_after is not None and step.stall_after >= len(pieces):
                await asyncio.Event().wait()
            if step.error is not None:
                raise step.error
            yield _attempt(step, req, "".join(pieces))
        finally:
            self.streams_closed += 1

    def classify(self, exc: BaseException, in_stream: bool) -> AttemptError:
        return classify_common(exc, in_stream) or unexpected_failure(exc)

    def refused_param(self, message: str) -> str | None:
        return refused_param(message, REFUSED, {})

    def known_window(self, model: str) -> int | None:
        return self.window


def _attempt(step: Step, req: CallRequest, text: str) -> Attempt:
    prompt = approx_message_tokens(prompt_texts(req.messages, req.tools, req.response_format))
    usage = step.usage or Usage(input_tokens=prompt, output_tokens=approx_tokens(text))
    return Attempt(
        text=text, model=req.model, usage=usage, finish_reason=step.finish_reason, service_s=step.service_s
    )
