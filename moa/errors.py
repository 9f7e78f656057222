"""Errors a MoA run can end in. Each carries the HTTP status and OpenAI error type it maps to,
so every transport reports it the same way; and why a run turned to its fallback chain, which an
error carries as a result does."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel

from moa.types import ErrorKind, error_text

# How a rejected document's failure begins (``moa.engine.structured``): a run whose every answer
# was rejected so ends ``invalid_structured_output``, one whose calls were, ``invalid_tool_calls``.
DOCUMENT_REJECTED = "the answer is not the JSON document the response_format asks for"


class FallbackReason(StrEnum):
    """Why a run turned to its fallback chain: the signal metrics, the cache and the benchmark decide
    on (``MoAResult.fallback`` is the same for people, and only for display)."""

    # A proposer layer (or refine round) missed its quorum: the single-model fallback answered.
    QUORUM_MISSED = "quorum_missed"
    # The layers met their quorum but every aggregator of the chain failed.
    AGGREGATORS_FAILED = "aggregators_failed"
    # A refine round's intermediate synthesis failed.
    SYNTHESIS_FAILED = "synthesis_failed"


class Failure(BaseModel):
    provider: str
    model: str
    kind: ErrorKind
    stage: str
    # The provider's Retry-After (or our limiter's estimate), when there was one.
    retry_after_s: float | None = None
    # The provider's own reason (redacted of keys by its adapter), shortened for the message.
    message: str = ""
    # The refused prompt was one the service built (references, a continuation), not the
    # client's messages as they came: a refusal of it is the service's failure, never the client's.
    built: bool = False
    # The context window the provider's refusal named: the prompt did not fit it.
    context_window: int | None = None


class MoAError(Exception):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"
    retry_after_s: float | None = None
    # The request field at fault, as OpenAI's ``param``.
    param: str | None = None
    # Set by the engine when the run had turned to its fallback chain (see MoAResult).
    fallback_reason: FallbackReason | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(MoAError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class UnknownPreset(InvalidRequest):
    """A ``model`` that is neither a preset nor a configured model: OpenAI's 404
    ``model_not_found`` with ``param: "model"``, which clients map to ``NotFoundError``."""

    status_code = 404
    code = "model_not_found"
    param = "model"


class OverCap(InvalidRequest):
    """The request would cause more work than ``caps`` allows; the message names the cap."""

    code = "over_cap"

    def __init__(self, message: str, param: str = "plan") -> None:
        super().__init__(message)
        self.param = param


class ContextWindowExceeded(InvalidRequest):
    """The client's own messages (and the answer it asked for) fit no model that could answer them:
    a request no retry or trimming can help, refused before any call with the numbers."""

    code = "context_length_exceeded"
    param = "messages"


class InvalidPlan(InvalidRequest):
    status_code = 422
    code = "invalid_plan"


class NoHealthyProvider(MoAError):
    """Every provider a plan could use has its circuit open: nothing was sent."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_healthy_provider"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(MoAError):
    """The service is stopping: a new request is refused, or one still running when the drain
    time ran out is ended. Another replica, or this one after a restart, can take it."""

    status_code = 503
    error_type = "service_unavailable"
    code = "shutting_down"
    retry_after_s = 1.0


class DeadlineExceeded(MoAError):
    status_code = 504
    error_type = "timeout"
    code = "deadline_exceeded"


class AllProvidersFailed(MoAError):
    """Every route to an answer failed; the message lists each provider's failure kind."""

    status_code = 502
    error_type = "upstream_error"
    code = "all_providers_failed"

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = list(failures)
        # Stragglers we cancelled ourselves say nothing about why the providers failed.
        kinds = {f.kind for f in self.failures} - {ErrorKind.CANCELLED}
        if kinds and kinds <= {ErrorKind.RATE_LIMITED, ErrorKind.CIRCUIT_OPEN}:
            # Only back-pressure: the caller should come back later rather than treat it as broken.
            self.status_code = 429 if ErrorKind.RATE_LIMITED in kinds else 503
            self.error_type = "rate_limit_error" if self.status_code == 429 else "service_unavailable"
            # The soonest any of them said it could answer again (upstream Retry-After, a
            # circuit's cool-down, a rate budget's refill); 1 s when none said.
            hints = [f.retry_after_s for f in self.failures if f.retry_after_s is not None]
            self.retry_after_s = min(hints) if hints else 1.0
        elif kinds and kinds <= {ErrorKind.TIMEOUT}:
            self.status_code = 504
            self.error_type = "timeout"
        elif kinds and kinds <= {ErrorKind.INVALID_OUTPUT}:
            # Every model answered, and none within the request's contract: the listing names
            # each violation. Never a call, nor a document, the client could act on wrongly.
            # A document its response format refuses says so first (``moa.engine.structured``).
            documents = any(f.message and f.message.startswith(DOCUMENT_REJECTED) for f in self.failures)
            self.code = "invalid_structured_output" if documents else "invalid_tool_calls"
        elif kinds and kinds <= {ErrorKind.INTERNAL}:
            # Nothing a provider did: our own failure, reported as such.
            self.status_code = 500
            self.error_type = "server_error"
            self.code = "internal_error"
        elif (
            kinds
            and kinds <= {ErrorKind.BAD_REQUEST, ErrorKind.INTERNAL}
            and not any(f.built and f.kind is ErrorKind.BAD_REQUEST for f in self.failures)
        ):
            # Every provider refused the request itself: the caller can fix it, retrying cannot.
            # Not when a refused prompt was one we built (an aggregator's, with the references):
            # the client sent nothing wrong, so that stays a 502 (below).
            self.status_code = 400
            self.error_type = "invalid_request_error"
            self.code = "refused_by_providers"
            refused = [f for f in self.failures if f.kind is ErrorKind.BAD_REQUEST]
            if refused and all(f.context_window is not None for f in refused):
                # Each refused the client's messages as too long for the window it named (a
                # self-hosted server's window, before the service had learned it): the same
                # 400 as a request the service refuses itself once it knows the window.
                self.code, self.param = "context_length_exceeded", "messages"
        listing = ", ".join(
            f"{f.provider}/{f.model} ({f.stage}): {f.kind}"
            + (f" ({error_text(f.message)})" if f.message and f.kind is not ErrorKind.CANCELLED else "")
            for f in self.failures
        )
        super().__init__(f"every provider failed: {listing or 'no call was possible'}")
