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

# An ingress replica that has not checked in for this long is gone (scaled down, restarted).
INGRESS_STALE_S = 5.0


class RouterDeployment:
    def __init__(self, config: dict[str, Any], providers: Mapping[str, Any]) -> None:
        self.config = parse_config(config, "the deployed config")
        init_replica_telemetry(self.config)
        # The LLM classifier, when configured, calls its model through the provider deployments.
        self.policy = RouterPolicy(self.config, HandleCaller(providers))
        may_idle = [
            name
            for name, p in self.config.providers.items()
            if p.deployment.num_replicas is None and p.deployment.autoscaling.min_replicas == 0
        ]
        self.board = HealthBoard(expected=self.config.providers, may_idle=may_idle, now=time.monotonic())
        # The drain `moa serve` asked for on shutdown, which every ingress replica learns at its
        # next check-in; and what each replica said last: (when, requests in progress, state).
        self._drain: dict[str, Any] | None = None
        self._ingress: dict[str, tuple[float, dict[str, Any]]] = {}

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

    def checkin(self, replica: str, state: Mapping[str, Any]) -> dict[str, Any]:
        """An ingress replica's periodic call: it says how it is doing (requests in progress,
        whether it drained) and gets the health view to route with and any drain asked for."""
        now = time.monotonic()
        self._ingress[replica] = (now, dict(state))
        return {"view": self.board.view(now), "drain": self._drain}

    def drain(self, drain_s: float, hurry: bool = False) -> None:
        """Ask every ingress replica to drain (``moa serve`` does on SIGINT/SIGTERM)."""
        self._drain = {"drain_s": drain_s, "hurry": hurry}

    def drain_status(self) -> dict[str, dict[str, Any]]:
        """What each live ingress replica last said: ``in_flight``, ``drained``, ``cut``."""
        now = time.monotonic()
        for replica in [r for r, (t, _) in self._ingress.items() if now - t > INGRESS_STALE_S]:
            del self._ingress[replica]
        return {replica: state for replica, (_, state) in self._ingress.items()}

    def health_view(self) -> HealthView:
        """What ingress replicas route with: which providers are unavailable, recent latencies."""
        return self.board.view(time.monotonic())

    def health(self) -> dict[str, dict[str, object]]:
        return self.board.summary(self.config.providers, time.monotonic())
