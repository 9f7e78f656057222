"""Span decoration for a run: which attributes and events each engine span carries.

Kept apart from the engine's logic so that a stage reads as what it does, and so that every
attribute name the dashboards and tests rely on is listed in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, Status, StatusCode

from moa.plan import LayerSpec, Plan
from moa.result import MoAResult, RouteDecision, Stage, VoteOutcome

if TYPE_CHECKING:
    from moa.engine.layer import LayerOutcome


def routed(span: Span, decision: RouteDecision) -> None:
    """The ``moa.route`` span: which preset the router chose and why."""
    span.set_attributes(
        {
            "moa.preset": decision.preset,
            "moa.router.forced": decision.forced,
            "moa.router.reason": decision.reason,
            "moa.router.complexity": decision.complexity.value if decision.complexity else "",
            "moa.router.task": decision.task.value if decision.task else "",
            "moa.router.substitutions": len(decision.substitutions),
        }
    )


def run_planned(span: Span, decision: RouteDecision, plan: Plan) -> None:
    """The ``moa.run`` span, once the plan is fixed."""
    span.set_attributes(
        {
            "moa.preset": decision.preset,
            "moa.router.reason": decision.reason,
            "moa.aggregation": plan.aggregation,
        }
    )


def run_answered(span: Span, result: MoAResult) -> None:
    """The ``moa.run`` span, once the run has its answer."""
    span.set_attributes(
        {
            "moa.answered_by": f"{result.provider}/{result.model}",
            "moa.calls": len(result.calls),
            "moa.cost_usd": result.cost_usd,
            "moa.stragglers_cancelled": result.stragglers_cancelled,
            "moa.fallback": result.fallback or "",
            "gen_ai.usage.input_tokens": result.usage.input_tokens,
            "gen_ai.usage.output_tokens": result.usage.output_tokens,
        }
    )


def failed(span: Span, code: str) -> None:
    """A span whose run ended in one of the engine's typed errors."""
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR, code))


def layer_attributes(index: int, layer: LayerSpec, round_: int | None) -> dict[str, Any]:
    """The ``moa.layer`` span's attributes at its start."""
    attrs: dict[str, Any] = {
        "moa.layer.index": index,
        "moa.layer.proposers": len(layer.proposers),
        "moa.layer.quorum": layer.needed,
    }
    if round_ is not None:
        attrs["moa.round"] = round_
    return attrs


def layer_done(span: Span, outcome: LayerOutcome) -> None:
    """The ``moa.layer`` span, once its calls are done or cut."""
    span.set_attributes(
        {
            "moa.layer.succeeded": len(outcome.answers),
            "moa.layer.quorum_met": outcome.met,
            "moa.layer.stragglers_cancelled": outcome.stragglers,
        }
    )


def fuse_attributes(stage: Stage, references: int, round_: int | None, step: int | None) -> dict[str, Any]:
    """The ``moa.fuse`` span's attributes at its start."""
    return {
        "moa.stage": stage.value,
        "moa.fuse.references": references,
        "moa.round": round_ or 0,
        "moa.staircase_step": step or 0,
    }


def fuse_continued(span: Span, name: str, chars: int, ok: bool) -> None:
    """An aggregator took over an answer another one's stream had started and broken off."""
    span.add_event("moa.fuse.continue", {"moa.model": name, "moa.continued_after_chars": chars, "moa.ok": ok})
    span.set_attributes(
        {
            "moa.fuse.continued": True,
            "moa.fuse.continued_by": name,
            "moa.fuse.continued_after_chars": chars,
        }
    )


def fuse_broken(span: Span, name: str) -> None:
    """An aggregator's stream broke after its text had gone out."""
    span.add_event("moa.fuse.stream_broken", {"moa.model": name})


def fuse_rejected(span: Span, name: str, why: str, calls: bool = True) -> None:
    """A model of the chain answered with calls that break the tools' contract (``calls``), or
    with a document its response format refuses: the violations, and the chain goes on to its
    next model."""
    what = "moa.tools" if calls else "moa.structured"
    span.add_event(f"{what}.rejected", {"moa.model": name, f"{what}.violations": why})


def tool_vote(span: Span, outcome: VoteOutcome, what: str = "moa.tools") -> None:
    """The ``moa.run`` span of a request with tools (or whose proposers wrote documents, ``what``
    ``moa.structured``): what the vote among the proposals saw."""
    span.set_attributes(
        {
            f"{what}.vote.proposals": outcome.proposals,
            f"{what}.vote.needed": outcome.needed,
            f"{what}.vote.agreed": outcome.agreed,
            f"{what}.vote.decided": outcome.decided,
        }
    )
    if outcome.calls:
        span.set_attribute(f"{what}.vote.{'calls' if what == 'moa.tools' else 'document'}", outcome.calls)


def structured_answer(span: Span, fmt: str, refused: bool) -> None:
    """The ``moa.run`` span of a request with a response format, answered: the document passed
    validation (``moa.structured.valid``), or the answer is the model's refusal (a run whose
    every answer failed validation ends ``invalid_structured_output`` instead)."""
    span.set_attributes(
        {"moa.structured.format": fmt, "moa.structured.valid": not refused, "moa.structured.refused": refused}
    )


def fuse_answered(span: Span, name: str) -> None:
    span.set_attribute("moa.answered_by", name)


def fuse_exhausted(span: Span) -> None:
    span.set_status(Status(StatusCode.ERROR, "every model of the chain failed"))
