"""The router deployment: the routing policy plus the live health state it needs.

Provider replicas report their circuit states and latencies here. The router answers "which plan
for this request" (``route``) and hands its health view to ingress replicas, which route with a
local copy of the same policy so the decision costs no hop on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context

from actors.handles import HandleCaller
from actors.telemetry import init_replica_telemetry
from moa.config import parse_config
from moa.engine.router import HealthBoard, HealthView, RouterPolicy
from moa.types import ChatMessage
from observability.tracing import extract


class RouterDeployment:
    def __init__(self, config: dict[str, Any], providers: Mapping[str, Any]) -> None:
        self.config = parse_config(config, "the deployed config")
        init_replica_telemetry(self.config)
        # The LLM classifier, when configured, calls its model through the provider deployments.
        self.policy = RouterPolicy(self.config, HandleCaller(providers))
        self.board = HealthBoard()

    async def route(
        self, messages: list[ChatMessage], preset: str | None, trace: Mapping[str, str] | None = None
    ) -> Any:
        token = otel_context.attach(extract(trace))  # an LLM classifier's call joins the trace
        try:
            return await self.policy.route(messages, preset, self.board.view(time.monotonic()))
        finally:
            otel_context.detach(token)

    def report(
        self, provider: str, replica: str, snapshot: Mapping[str, Any], latencies: Mapping[str, float]
    ) -> None:
        self.board.report(provider, replica, snapshot, latencies, time.monotonic())

    def health_view(self) -> HealthView:
        """What ingress replicas route with: which providers are unavailable, recent latencies."""
        return self.board.view(time.monotonic())

    def health(self) -> dict[str, dict[str, object]]:
        return self.board.summary(self.config.providers, time.monotonic())
