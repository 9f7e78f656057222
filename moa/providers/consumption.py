"""What one provider call consumed, as far as this client can know it: the charge of a call that
ends without an answer (given up, or cut mid-way by its consumer) and what it settles of the
rate budget. Kept here, in one place, since every way a call can end reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import CallRequest, Usage, image_tokens, prompt_texts, request_images


def prompt_read(req: CallRequest, provider_kind: str) -> int:
    """A call's prompt as its provider reads and bills it, estimated: the messages (with the calls
    they carry), the tool definitions, the response format's schema, and the images by the rule of
    the provider's kind. The one estimate for a call's worst case, for what a call consumed, and
    for the charge of a call cut before its provider reported its usage."""
    texts = prompt_texts(req.messages, req.tools, req.response_format)
    return approx_message_tokens(texts) + image_tokens(provider_kind, request_images(req.messages))


@dataclass
class Consumption:
    """What one call consumed of the token budget, as far as we can know it."""

    input_tokens: int
    sent: int = 0  # attempts that went out
    refused: int = 0  # of those, attempts refused with a status (or that never left our side)
    received: list[str] = field(default_factory=list)  # streamed text received so far
    # Tool call names and argument fragments received so far (generated, billed, never shown).
    tool_text: list[str] = field(default_factory=list)
    actual: int | None = None  # the provider's own usage, once it answered

    def billed(self, answered: bool = False) -> Usage:
        """What the provider bills for the attempts that did not answer: each one that read the
        prompt (every attempt sent but those refused with a status), and the text received; with
        ``answered``, the last attempt is the one that answered, and its own usage is reported.
        Without ``answered``, it is also the charge of a call cut before its result (``on_cut``)."""
        reads = self.sent - self.refused - (1 if answered else 0)
        output = 0 if answered else approx_tokens(self.generated_text)
        return Usage(input_tokens=self.input_tokens * max(reads, 0), output_tokens=output)

    def tokens(self) -> int:
        """The tokens to settle the rate budget's reservation with."""
        if self.actual is not None:
            return self.actual
        # An attempt refused with a status consumed nothing; any other (a timeout, a cut stream,
        # our cancellation) had its prompt read, and produced what we received.
        read_prompt = self.sent > self.refused or self.generated
        output = approx_tokens(self.generated_text)
        return (self.input_tokens if read_prompt else 0) + output

    @property
    def generated(self) -> bool:
        """Whether the provider has sent anything it generated (text or a tool call's pieces)."""
        return bool(self.received or self.tool_text)

    @property
    def generated_text(self) -> str:
        return "".join(self.received) + "".join(self.tool_text)
