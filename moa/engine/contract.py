"""A request's answer contract: its tools and its response format, checked as one.

Whatever writes the final answer (an aggregator, a single model, a fallback, the vote, a
proposal answering for failed aggregators), its answer is held to the contract before a client
sees any of it: an answer that breaks it is the failure ``INVALID_OUTPUT`` (never held against
its provider's health), and the next model of the chain is told why in its prompt. Tool calls
are checked by ``moa.engine.toolcalls``, a document by ``moa.engine.structured``; an answer of
calls is held to the tools, a text answer to the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moa.engine import structured, toolcalls
from moa.engine.toolcalls import MAX_VIOLATIONS
from moa.types import CallError, CallResult, ErrorKind, ResponseFormat, ToolSet

TOOLS_REJECTED = "the answer broke the tools' contract"


@dataclass(frozen=True)
class Verdict:
    """An answer as the contract leaves it (its document bare), and why it breaks it, if it does."""

    result: CallResult
    violations: tuple[str, ...] = ()
    # What the violations are of: the tools' contract or the response format.
    about: str = TOOLS_REJECTED

    @property
    def ok(self) -> bool:
        return not self.violations

    def rejected(self) -> CallResult:
        """The answer as the failure it is: ``INVALID_OUTPUT``, its violations the message."""
        message = f"{self.about}: " + "; ".join(self.violations[:MAX_VIOLATIONS])
        return self.result.model_copy(
            update={"error": CallError(kind=ErrorKind.INVALID_OUTPUT, message=message)}
        )

    def correction(self) -> str:
        """What the next model of a chain is told of this answer."""
        if self.about == TOOLS_REJECTED:
            return toolcalls.correction(self.violations)
        return correction(self.violations)


@dataclass(frozen=True)
class Contract:
    """The request's tools and response format (either may be None)."""

    tools: ToolSet | None = None
    response_format: ResponseFormat | None = None

    @property
    def binding(self) -> bool:
        """Whether there is anything to hold an answer to: then it is held until checked (a
        streaming client gets it replayed once it passed)."""
        return self.tools is not None or self.response_format is not None

    def check(self, res: CallResult) -> Verdict:
        """``res`` held to the contract."""
        if self.tools is not None:
            found = toolcalls.check(res, self.tools).violations
            if found or res.tool_calls:
                return Verdict(res, tuple(found))
        if self.response_format is None:
            return Verdict(res)
        bare, held = structured.checked(res, self.response_format)
        return Verdict(bare, tuple(held.violations), structured.REJECTED)


def correction(violations: Sequence[str]) -> str:
    """What the next model of a chain is told of a document the model before it wrote."""
    listed = "\n".join(f"- {v}" for v in violations[:MAX_VIOLATIONS])
    return (
        f"A previous answer to this request was rejected because {structured.REJECTED}:\n{listed}\n"
        "Answer again with only the JSON document, one the schema accepts."
    )
