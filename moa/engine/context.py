"""One run's request and context: what the private stages of a run share.

``RunOptions`` declares the keyword arguments ``MoAEngine.run`` and ``MoAEngine.stream`` take;
``RunRequest`` is what both build of them, the options as given. The only difference between the
two is ``stream`` (whether the final answer is streamed), so the one pipeline reads it from the
request rather than from a private flag.

``RunContext`` is what a run knows once its plan is fixed: the transport and config it calls with,
the messages, plan, parameters and deadline, and the state it accumulates (calls, failures, notes,
critical path). Every stage (``layer``, ``chain``, the engine's pipeline) takes this one object
instead of threading the same five to nine parameters through each private method.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from moa.cache import CacheTicket, ProposalCache, ResponseCache
from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.deadline import Deadline
from moa.engine.calls import WINDOWS
from moa.engine.contract import Contract
from moa.engine.fusion import Fuser
from moa.engine.toolcalls import ToolMode, VoteOutcome
from moa.errors import AllProvidersFailed, Failure, FallbackReason
from moa.plan import AggregationMode, Plan, PlanMode, PlanShape
from moa.result import CallRecord, Progress, RouteDecision, Stage
from moa.types import CallRequest, CallResult, ChatMessage, GenerationParams, ResponseFormat, ToolSet

# A routing decision: the plan, why, and any calls the router made (an LLM classifier).
Routed = tuple[Plan, RouteDecision, list[CallResult]]
# The ``admit`` hook: it sees the routed plan as it will run, and the shape that makes any other
# plan it chooses instead (a cheaper tier) into the plan that would run.
Admit = Callable[[Routed, PlanShape], Awaitable[Routed]]


class RunOptions(TypedDict, total=False):
    """The keyword arguments ``MoAEngine.run`` and ``MoAEngine.stream`` take: declared here once,
    carried as they are in ``RunRequest.options``."""

    # A preset by name (``auto`` routes), or an explicit plan.
    preset: str | None
    plan: Plan | None
    params: GenerationParams | None
    # The run ends at ``deadline`` (or ``deadline_s`` from now) with ``DeadlineExceeded``.
    deadline_s: float | None
    deadline: Deadline | None
    # A decision already taken by ``MoAEngine.route``.
    routed: Routed | None
    # Told of every call recorded. The router's calls reach it before ``admit`` sees the plan, so
    # they count even when admission refuses.
    on_call: Callable[[CallRecord], None] | None
    # Sees the routed plan as it will run (every override applied) before any model is called, and
    # may refuse it (raise) or replace it with another plan put through the shape it is given (a
    # key's access rules and cost cap do both).
    admit: Admit | None
    # Overrides the plan's aggregation mode (staircase applies to streamed layered plans; others
    # run final).
    aggregation: AggregationMode | None
    # Awaited once models will be called (the cache had no answer), before any call; may refuse
    # (raise): a key's budget reservation, a state-store write a cached answer does not need.
    reserve: Callable[[], Awaitable[None]] | None
    # Scopes the router's memory of the request (its LLM classifier's cache; by default the cache
    # ticket's scope).
    tenant: str | None
    # Awaited before the router's LLM classifier calls its model; may refuse (raise): a key that
    # cannot pay for the call.
    before_classifier: Callable[[CallRequest], Awaitable[None]] | None
    # What the response cache may do for this request (the API's, per key); None: the local scope.
    ticket: CacheTicket | None
    # The tools every model of the run may call (``moa.engine.toolcalls``); None: a text answer.
    tools: ToolSet | None
    # How the final calls are decided (``vote`` or ``aggregate``), over the plan's ``tools``.
    tool_mode: ToolMode | None
    # The format the answer must have (``moa.engine.structured``); None: free text.
    response_format: ResponseFormat | None
    # How many answers (``n``; at most ``caps.max_n``): the proposer stages run once, then the
    # final answer is written this many times, each sampled on its own (``moa.engine.choices``).
    choices: int | None


@dataclass(frozen=True)
class RunRequest:
    """One request to the engine, streamed or not: its messages and its options as given."""

    messages: Sequence[ChatMessage]
    options: RunOptions = field(default_factory=lambda: RunOptions())
    # Whether the final answer is streamed as TextDeltas (``stream``) or only returned (``run``).
    stream: bool = True
    # When the run must end: the options' ``deadline``, or else ``deadline_s`` from when the
    # request was made (taken once, here).
    deadline: Deadline = field(init=False)

    def __post_init__(self) -> None:
        given = self.options.get("deadline")
        deadline = given if given is not None else Deadline.after(self.options.get("deadline_s"))
        object.__setattr__(self, "deadline", deadline)

    def shape(self, plan: Plan) -> Plan:
        """``plan`` as this request would run it (its aggregation override; staircase only when
        streamed): what ``admit`` projects and caps, and what the run then runs."""
        # A tool call or a document cannot be streamed before it is checked: such a request never
        # climbs; nor does one with several answers (the staircase's steps write one answer).
        stream = self.stream and not self.contract.binding and self.choices == 1
        return plan.as_run(self.options.get("aggregation"), stream)

    @property
    def contract(self) -> Contract:
        """What the answer is held to: the request's tools and response format."""
        return Contract(self.options.get("tools"), self.options.get("response_format"))

    @property
    def choices(self) -> int:
        """How many answers the request asks for (``n``; 1 unless given)."""
        given = self.options.get("choices")
        return 1 if given is None else given


@dataclass
class RunContext:
    """Everything one run shares between its stages, and its mutable state."""

    # What the run calls with (the engine's; the same for every run).
    config: MoAConfig
    caller: ModelCaller
    fuser: Fuser
    cache: ResponseCache | None
    # What this run is.
    messages: list[ChatMessage]
    plan: Plan
    decision: RouteDecision
    params: GenerationParams
    stream: bool
    t0: float
    deadline: Deadline
    # What the response cache may do for this run (None: no cache).
    ticket: CacheTicket | None = None
    # The tools the run's models may call, and how the final calls are decided; with tools the
    # answer is held until it is decided and validated, then ``replay``ed to a streaming client.
    tools: ToolSet | None = None
    tool_mode: ToolMode = "vote"
    replay: bool = False
    # The answer's format, checked like the tools (``moa.engine.contract``); None: free text.
    response_format: ResponseFormat | None = None
    # What the vote saw and decided (a run with tools whose plan has proposers).
    vote: VoteOutcome | None = None
    # What the vote among the proposals' documents saw (``structured: proposers``).
    document_vote: VoteOutcome | None = None
    # How many answers the run writes (``n``), and which one this view of the run writes (None: the
    # run's one answer, or the stages every answer shares; see ``moa.engine.choices``).
    choices: int = 1
    choice: int | None = None
    # Told of every call as it is recorded (the API meters a request's spend with it).
    on_call: Callable[[CallRecord], None] | None = None
    # Told where the proposer layers stand, for a streaming client waiting for its first token.
    progress: Callable[[Progress], None] | None = None
    # Why the run turned to its fallback chain, if it did (kept for a run that then failed).
    fallback_reason: FallbackReason | None = None
    records: list[CallRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provider_critical_s: float | None = None
    # The answers of the last proposer layer (or refine round) that met its quorum, in the layer's
    # order: what the run answers with when every aggregator fails (``Plan.on_aggregators_failed``).
    proposals: list[CallResult] = field(default_factory=list)

    @property
    def contract(self) -> Contract:
        """What the final answer is held to: the request's tools and response format."""
        return Contract(self.tools, self.response_format)

    @property
    def proposers_formatted(self) -> bool:
        """Whether the proposers are asked for the response format too (``structured: proposers``)."""
        return self.response_format is not None and self.plan.structured == "proposers"

    @property
    def proposal_caller(self) -> ModelCaller:
        """What a proposer's call goes through: the response cache's proposal level over the
        transport when this run may use it (``cache.proposals``, and a ticket), else the transport."""
        if self.cache is not None and self.ticket is not None and self.config.cache.proposals:
            return ProposalCache(self.caller, self.cache, self.ticket)
        return self.caller

    @property
    def layers(self) -> int:
        """How many proposer stages the plan runs (refine rounds, or layers)."""
        return self.plan.rounds if self.plan.mode is PlanMode.REFINE else len(self.plan.layers)

    def offset(self) -> float:
        return time.monotonic() - self.t0

    def note(self, *notes: str) -> None:
        self.notes.extend(n for n in notes if n not in self.notes)

    def add_provider_service(self, seconds: float | None) -> None:
        """One sequential stage's provider-reported service time onto the critical path's sum (a
        stage none of whose calls reported one adds nothing)."""
        if seconds is not None:
            self.provider_critical_s = (self.provider_critical_s or 0.0) + seconds

    def record(self, res: CallResult, rec: CallRecord, *, notify: bool = True, built: bool = False) -> None:
        """Keep ``rec`` (and ``res``'s failure, if any); tell ``on_call`` unless ``notify`` is off
        (the router's calls: the engine told it before admission, so they are billed even when
        admission then refuses the request). ``built`` says the call's prompt was one the run
        built (references, a continuation): its refusal is then never the client's fault."""
        self.records.append(rec)
        if self.on_call is not None and notify:
            self.on_call(rec)
        # What the call said of its model's window (a listing, or a refusal naming it): on Ray the
        # provider replica heard it, and the references are fitted here.
        WINDOWS.learn_from(res)
        if res.error is not None:
            self.failures.append(
                Failure(
                    provider=res.provider,
                    model=res.requested_model,
                    kind=res.error.kind,
                    stage=self.role_of(rec),
                    retry_after_s=res.error.retry_after_s,
                    message=res.error.message,
                    built=built,
                    context_window=res.error.context_window,
                )
            )

    def role_of(self, rec: CallRecord) -> str:
        """The call's role as an error names it: a plan with no layers (a direct call to a model,
        or ``single``) has no aggregator, only the model that answers (``direct``)."""
        if rec.stage is Stage.AGGREGATOR and self.plan.is_single:
            return "direct"
        return rec.stage.value if rec.layer is None else f"{rec.stage.value} layer {rec.layer}"

    def raise_failed(self) -> None:
        """End the run: at its deadline if that passed, else with every failure listed."""
        self.deadline.check()
        raise AllProvidersFailed(self.failures)
