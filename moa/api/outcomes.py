"""Where the end of each chat completion is reported: the request metrics (its status, cost and
latency, or its error), and a sample of the answered ones for shadow evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from moa.errors import MoAError
from moa.result import MoAResult
from moa.types import ChatMessage
from moa_observability.metrics import RequestMetrics


class Shadow(Protocol):
    """What the API hands answered requests to (``moa.eval.shadow.ShadowEvaluator``)."""

    def offer(self, messages: Sequence[ChatMessage], result: MoAResult, requested: str) -> object: ...


class Outcomes:
    def __init__(self, metrics: RequestMetrics, shadow: Shadow | None) -> None:
        self.metrics, self.shadow = metrics, shadow

    def answered(
        self, result: MoAResult, seconds: float, messages: Sequence[ChatMessage], model: str
    ) -> None:
        """An answer went out: counted, and offered to the shadow evaluation (which starts a
        task of its own and never waits)."""
        complexity = result.decision.complexity.value if result.decision.complexity else None
        self.metrics.record(
            result.preset,
            complexity,
            200,
            seconds,
            result.fallback_reason,
            result.decision.classifier_cached,
            cost_usd=result.cost_usd,
            critical_path_s=result.critical_path_s,
        )
        if self.shadow is not None:
            self.shadow.offer(messages, result, model)

    def failed(self, model: str, error: MoAError, seconds: float) -> None:
        """The request ended in ``error`` (before its headers, or inside its stream)."""
        self.metrics.record(model, None, error.status_code, seconds, error.fallback_reason)

    def first_token(self, model: str, seconds: float) -> None:
        self.metrics.first_token(model, seconds)
