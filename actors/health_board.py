"""The health board deployment: the one place that knows how every provider is doing.

Provider replicas report their circuit states and latencies here; ingress replicas check in every
``HEALTH_REFRESH_S``, saying how they are doing, and take the board's health view back. Routing
itself never happens here: each ingress replica runs its own copy of the routing policy over that
view, so the decision costs no hop on the request path. ``moa serve`` also asks for a drain here
on shutdown, which the ingress replicas learn at their next check-in.

It is also where the receipts of cut calls wait for their requests' settlements
(``moa.engine.receipts``): the one place every provider replica and every ingress replica can
reach by name. A provider deployment's own handle would not do: it picks any of its replicas,
not the one that served the call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from moa.config import DeploymentOptions, MoAConfig, ObservabilityConfig
from moa.engine.receipts import Receipts
from moa.engine.router import HealthBoard, HealthView
from moa.types import Usage
from moa_actors.options import serve_options
from moa_actors.telemetry import init_replica_telemetry

# The deployment's name, which provider replicas and `moa serve` look its handle up by.
HEALTH_BOARD_NAME = "health-board"
# An ingress replica that has not checked in for this long is gone (scaled down, restarted).
INGRESS_STALE_S = 5.0


class HealthBoardDeployment:
    """Bound with the provider names and which of them may autoscale to zero replicas (a
    provider with no replica reporting is unavailable only if it may not); nothing else of the
    config."""

    def __init__(
        self, providers: Sequence[str], may_idle: Sequence[str], observability: dict[str, Any]
    ) -> None:
        init_replica_telemetry(ObservabilityConfig.model_validate(observability))
        self.providers = tuple(providers)
        self.board = HealthBoard(expected=self.providers, may_idle=may_idle, now=time.monotonic())
        # The drain `moa serve` asked for on shutdown, which every ingress replica learns at its
        # next check-in; and what each replica said last: (when, requests in progress, state).
        self._drain: dict[str, Any] | None = None
        self._ingress: dict[str, tuple[float, dict[str, Any]]] = {}
        self.receipts = Receipts()

    @classmethod
    def get_deployment_options(cls, opts: DeploymentOptions) -> dict[str, Any]:
        """Its Serve options from ``serve.health_board``. The ingress polls it every 0.5 s and each
        provider replica reports to it every 2 s: access lines for those calls would bury
        everything else in its log."""
        return {
            "name": HEALTH_BOARD_NAME,
            "logging_config": {"enable_access_log": False},
            **serve_options(opts, default_max_ongoing=1000),
        }

    @staticmethod
    def config_slice(cfg: MoAConfig) -> dict[str, Any]:
        """What of ``cfg`` it is bound with (its keyword arguments), as plain data."""
        may_idle = [
            name
            for name, p in cfg.providers.items()
            if p.deployment.num_replicas is None and p.deployment.autoscaling.min_replicas == 0
        ]
        return {
            "providers": list(cfg.providers),
            "may_idle": may_idle,
            "observability": cfg.observability.model_dump(mode="json"),
        }

    def report(
        self, provider: str, replica: str, snapshot: Mapping[str, Any], latencies: Mapping[str, float]
    ) -> None:
        self.board.report(provider, replica, snapshot, latencies, time.monotonic())

    async def receipt(self, call_id: str, used: Usage) -> None:
        """A provider replica's receipt for a call its caller cut (async: on the board's loop,
        where ``receipts`` waits for it)."""
        self.receipts.put(call_id, used)

    async def take_receipts(self, call_ids: Sequence[str], within_s: float) -> dict[str, Usage]:
        """An ingress replica's settlement asks for the receipts of the calls it cut; they are
        handed over (and forgotten here) as they arrive, for at most ``within_s`` seconds."""
        return await self.receipts.take(call_ids, within_s)

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
        return self.board.summary(self.providers, time.monotonic())
