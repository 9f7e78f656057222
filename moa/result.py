"""What a MoA run returns: the answer, the plan used and why, every call, and the totals."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from moa.errors import FallbackReason
from moa.plan import Complexity, Plan, TaskType
from moa.types import CallResult, ErrorKind, ToolCall, Usage

AnswerSource = Literal["aggregator", "fallback", "proposal", "vote"]


class Stage(StrEnum):
    PROPOSER = "proposer"
    AGGREGATOR = "aggregator"  # a synthesis call: between refine rounds, or the final answer
    FALLBACK = "fallback"  # the single-model answer chain after a missed quorum
    CLASSIFIER = "classifier"  # the LLM router's classification call


class RouteDecision(BaseModel):
    """Which preset runs and why."""

    preset: str
    forced: bool
    complexity: Complexity | None = None
    task: TaskType | None = None
    reason: str
    substitutions: list[str] = Field(default_factory=list)
    # The LLM classifier's answer came from its cache (no classifier call was made).
    classifier_cached: bool = False


class CallRecord(BaseModel):
    stage: Stage
    layer: int | None = None  # 1-based proposer layer (or refine round) this call belongs to
    round: int | None = None
    provider: str
    model: str
    role: str | None = None
    ok: bool
    error_kind: ErrorKind | None = None
    error_message: str | None = None
    cancelled_straggler: bool = False
    started_s: float = 0.0  # offset from the start of the run
    latency_s: float = 0.0
    ttft_s: float | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    # The call ended before its provider reported its usage: ``usage`` and ``cost_usd`` are the
    # prompt plus the text received, estimated (see ``CallResult.usage_estimated``).
    usage_estimated: bool = False
    # The id its transport may leave a receipt under (see ``CallResult.cut_id``): for the ledger
    # only, never in ``moa.detail``.
    cut_id: str | None = Field(default=None, exclude=True)
    attempts: int = 0
    finish_reason: str | None = None
    # The function calls this call made (a proposal's, for the vote; an aggregator's, validated).
    tool_calls: list[ToolCall] = Field(default_factory=list)
    provider_service_s: float | None = None  # what the provider reported (see CallResult)
    # Generation parameters the adapter dropped or clamped for this model (see CallResult).
    adjustments: list[str] = Field(default_factory=list)
    # This aggregator continued an answer another one had started streaming when it broke: how
    # many characters of it were already out (given to this call as the text to continue).
    continued_after_chars: int | None = None
    # It took over an answer another aggregator's stream had started and broken off.
    took_over: bool = False
    # Staircase aggregation: which intermediate step this call was (None: the last, or no step), of
    # the aggregator or of a proposer of a later layer (its ``layer`` says which).
    staircase_step: int | None = None
    # Which answer of an ``n`` > 1 request this final call wrote (its choice's ``index``; None: the
    # run's one answer, or a call every answer shares, such as a proposer's).
    choice: int | None = None
    # Where the answer came from when not from the model now: "exact" or "semantic" (a cache
    # hit: usage and cost are zero, ``saved_cost_usd`` what it cost first), else None.
    cache: str | None = None
    similarity: float | None = None
    saved_cost_usd: float = 0.0

    @classmethod
    def from_result(
        cls,
        res: CallResult,
        *,
        stage: Stage,
        started_s: float,
        layer: int | None = None,
        round: int | None = None,
        role: str | None = None,
    ) -> CallRecord:
        return cls(
            stage=stage,
            layer=layer,
            round=round,
            provider=res.provider,
            model=res.model or res.requested_model,
            role=role,
            ok=res.ok,
            error_kind=res.error.kind if res.error else None,
            error_message=res.error.message if res.error else None,
            started_s=started_s,
            latency_s=res.latency_s,
            ttft_s=res.ttft_s,
            usage=res.usage,
            cost_usd=res.cost_usd,
            usage_estimated=res.usage_estimated,
            tool_calls=res.tool_calls,
            cut_id=res.cut_id,
            attempts=res.attempts,
            finish_reason=res.finish_reason,
            provider_service_s=res.provider_service_s,
            adjustments=res.adjustments,
            cache=res.cache,
            saved_cost_usd=res.saved_cost_usd,
        )


class Progress(BaseModel):
    """Where a streaming run stands, for the client while no text flows yet (``moa.progress``)."""

    stage: Literal["admitted", "proposers", "aggregating"]
    layer: int | None = None  # the proposer layer (or refine round) running, 1-based
    layers: int = 0
    proposers_done: int = 0  # succeeded so far in this layer
    proposers: int = 0
    quorum: int = 0
    # The preset that runs (set on ``admitted``): what ``auto`` resolved to, for the response's
    # ``model`` and ``x-moa-preset`` before any text goes out.
    preset: str | None = None

    def describe(self) -> str:
        if self.stage == "proposers":
            return (
                f"layer {self.layer}/{self.layers}: {self.proposers_done}/{self.proposers} "
                f"proposers done (quorum {self.quorum})"
            )
        return self.stage


class CacheOutcome(BaseModel):
    """How the response cache took part in one request (``moa.detail``'s ``cache``)."""

    # hit-exact | hit-semantic | miss | bypass (the x-moa-cache header)
    status: str = "bypass"
    similarity: float | None = None
    saved_cost_usd: float = 0.0
    age_s: float | None = None  # of the entry served
    proposals_from_cache: int = 0
    reason: str | None = None  # why it was bypassed or not stored


class VoteOutcome(BaseModel):
    """What the vote saw and decided, for ``moa.detail`` and the run's span."""

    # The proposals that answered, and how many the winning set of calls needed.
    proposals: int
    needed: int
    # How many proposals made the most common set of calls (0: none made calls).
    agreed: int = 0
    # Decided by the vote (no aggregator call), or handed to the aggregator.
    decided: bool = False
    # The winning calls, as ``name(arguments)`` lines, when the vote decided.
    calls: list[str] = Field(default_factory=list)
    # Why the vote did not decide, when it did not.
    reason: str | None = None


class Choice(BaseModel):
    """One of a run's answers when the request asked for several (``n`` > 1): written by its own
    final call (or chain), over the same proposals as the others."""

    index: int
    text: str
    provider: str
    model: str
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # The model's refusal to write the requested document (``text`` is then empty).
    refusal: str | None = None
    fallback: str | None = None
    fallback_reason: FallbackReason | None = None
    answer_source: AnswerSource = "aggregator"


class MoAResult(BaseModel):
    text: str
    preset: str
    plan: Plan
    decision: RouteDecision
    # The model whose answer is returned (final aggregator, or the fallback that answered).
    provider: str
    model: str
    finish_reason: str | None = None
    calls: list[CallRecord]
    usage: Usage
    cost_usd: float
    wall_time_s: float
    # Sum over sequential stages of the time each stage waited on its models.
    critical_path_s: float
    # Same, from the service times the providers reported: None when no call on the path reported
    # one; a stage whose calls reported none adds nothing, so with providers that do not all report
    # (Anthropic and Gemini never do) it is a lower bound.
    provider_critical_path_s: float | None = None
    fallback: str | None = None  # why a fallback answered, when one did (for people)
    # The same, as one of a few values (for metrics and programs): a proposer layer (or refine
    # round) missed its quorum; every aggregator failed; a refine round's synthesis failed.
    fallback_reason: FallbackReason | None = None
    # Where the answer came from: the aggregator chain (for a single plan, its one model); the
    # fallback chain; or, every aggregator having failed, a proposal the run already had
    # (``Plan.on_aggregators_failed``), returned as it was written, unaggregated.
    answer_source: AnswerSource = "aggregator"
    notes: list[str] = Field(default_factory=list)
    cache: CacheOutcome = Field(default_factory=CacheOutcome)
    # The answer's function calls (finish_reason ``tool_calls``), validated against the request's
    # tools; and what the vote among the proposals' calls saw and decided, when there was one.
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_vote: VoteOutcome | None = None
    # The model's refusal to write the requested document (``text`` is then empty), returned as
    # OpenAI's ``message.refusal``; and what the vote among the proposals' documents saw
    # (``structured: proposers``; its winner, as canonical JSON, in ``calls``).
    refusal: str | None = None
    document_vote: VoteOutcome | None = None
    # Every answer, in order, when the request asked for several (``n`` > 1): the fields above are
    # the first one's, and ``calls``, ``usage`` and ``cost_usd`` count every answer's calls. Empty
    # for the one answer of an ordinary run.
    choices: list[Choice] = Field(default_factory=list)

    def answers(self) -> list[Choice]:
        """The run's answers, each with its ``index``: ``choices``, or the one answer."""
        if self.choices:
            return self.choices
        return [self.choice(0)]

    def choice(self, index: int) -> Choice:
        """This result's answer as the choice at ``index``."""
        return Choice(
            index=index,
            text=self.text,
            provider=self.provider,
            model=self.model,
            finish_reason=self.finish_reason,
            tool_calls=self.tool_calls,
            refusal=self.refusal,
            fallback=self.fallback,
            fallback_reason=self.fallback_reason,
            answer_source=self.answer_source,
        )

    @property
    def stragglers_cancelled(self) -> int:
        return sum(c.cancelled_straggler for c in self.calls)
