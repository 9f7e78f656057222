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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from moa.config import DeploymentOptions, MoAConfig, ObservabilityConfig
from moa.engine.receipts import Receipts
from moa.types import HealthView, Usage
from moa_actors.options import serve_options
from moa_actors.telemetry import init_replica_telemetry

# The deployment's name, which provider replicas and `moa serve` look its handle up by.
HEALTH_BOARD_NAME = "health-board"
# An ingress replica that has not checked in for this long is gone (scaled down, restarted).
INGRESS_STALE_S = 5.0


class HealthBoard:
    """The router's live state: circuit states reported by provider replicas, latency per model.

    A provider counts as unavailable when every replica that reported recently says its circuit is
    open; a replica silent for ``stale_s`` is forgotten (it may have been scaled down). A provider
    of ``expected`` with no replica reporting at all, ``startup_grace_s`` after the board began
    (``now``), is unavailable too: its replicas cannot start (a resource no node has, say), and a
    call to it would only wait out its deadline. Providers in ``may_idle`` (autoscaled down to
    zero replicas) are exempt: a call is what brings their replicas back.
    """

    def __init__(
        self,
        stale_s: float = 30.0,
        alpha: float = 0.2,
        *,
        expected: Iterable[str] = (),
        may_idle: Iterable[str] = (),
        now: float | None = None,
        startup_grace_s: float = 10.0,
    ) -> None:
        self.stale_s = stale_s
        self.alpha = alpha
        self._expected = tuple(expected)
        self._may_idle = frozenset(may_idle)
        self._since = now
        self.startup_grace_s = startup_grace_s
        self._replicas: dict[str, dict[str, tuple[float, dict[str, object]]]] = {}
        self._latency: dict[str, float] = {}

    def report(
        self,
        provider: str,
        replica: str,
        snapshot: Mapping[str, object],
        latencies: Mapping[str, float],
        now: float,
    ) -> None:
        self._replicas.setdefault(provider, {})[replica] = (now, dict(snapshot))
        for model, seconds in latencies.items():
            key = f"{provider}/{model}"
            old = self._latency.get(key)
            self._latency[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def _fresh(self, provider: str, now: float) -> list[dict[str, object]]:
        reports = self._replicas.get(provider, {})
        for replica in [r for r, (t, _) in reports.items() if now - t > self.stale_s]:
            del reports[replica]
        return [snap for _, snap in reports.values()]

    def _missing(self, now: float) -> set[str]:
        """Expected providers with no replica reporting, once start-up had time to happen."""
        if self._since is None or now - self._since < self.startup_grace_s:
            return set()
        return {p for p in self._expected if p not in self._may_idle and not self._fresh(p, now)}

    def view(self, now: float) -> HealthView:
        circuit_open = {
            p
            for p in self._replicas
            if (snaps := self._fresh(p, now)) and all(s.get("state") == "open" for s in snaps)
        }
        unavailable = frozenset(circuit_open | self._missing(now))
        return HealthView(unavailable=unavailable, latency_s=dict(self._latency))

    def summary(self, providers: Iterable[str], now: float) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for p in providers:
            snaps = self._fresh(p, now)
            states = [str(s.get("state")) for s in snaps]
            state = (
                ("scaled_to_zero" if p in self._may_idle else "no_replicas")
                if not snaps
                else "open"
                if all(s == "open" for s in states)
                else ("closed" if all(s == "closed" for s in states) else "degraded")
            )
            latency = {
                k.split("/", 1)[1]: round(v, 4) for k, v in self._latency.items() if k.startswith(p + "/")
            }
            out[p] = {"state": state, "replicas": len(snaps), "replica_states": states, "latency_s": latency}
        return out


class IngressRoster:
    """What each live ingress replica said at its last check-in: (when, state).

    A replica silent for ``stale_s`` is gone (scaled down, restarted) and is forgotten at the next
    check-in of any replica, not only when ``moa serve`` asks for the drain status on shutdown: the
    roster holds the replicas alive now, never every one that autoscaling ever started.
    """

    def __init__(self, stale_s: float = INGRESS_STALE_S) -> None:
        self.stale_s = stale_s
        self._last: dict[str, tuple[float, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def checkin(self, replica: str, state: Mapping[str, Any], now: float) -> None:
        self._last[replica] = (now, dict(state))
        self._forget_stale(now)

    def live(self, now: float) -> dict[str, dict[str, Any]]:
        """What each live replica said last."""
        self._forget_stale(now)
        return {replica: state for replica, (_, state) in self._last.items()}

    def _forget_stale(self, now: float) -> None:
        for replica in [r for r, (t, _) in self._last.items() if now - t > self.stale_s]:
            del self._last[replica]


class HealthBoardConfig(BaseModel):
    """What the health board is bound with: the provider names, which of them may autoscale to zero
    replicas, and its own scheduling; nothing else of the config."""

    providers: list[str] = Field(description="The providers whose replicas report here, in config order.")
    may_idle: list[str] = Field(
        description="The providers that may autoscale to zero replicas: one with no replica reporting "
        "is unavailable only if it may not."
    )
    observability: ObservabilityConfig = Field(description="The config's observability section.")
    deployment: DeploymentOptions = Field(description="Its Serve options (serve.health_board).")

    @classmethod
    def of(cls, cfg: MoAConfig) -> HealthBoardConfig:
        may_idle = [
            name
            for name, p in cfg.providers.items()
            if p.deployment.num_replicas is None and p.deployment.autoscaling.min_replicas == 0
        ]
        return cls(
            providers=list(cfg.providers),
            may_idle=may_idle,
            observability=cfg.observability,
            deployment=cfg.serve.health_board,
        )


class HealthBoardDeployment:
    """Bound with ``HealthBoardConfig``."""

    def __init__(self, config: HealthBoardConfig) -> None:
        init_replica_telemetry(config.observability)
        self.providers = tuple(config.providers)
        self.board = HealthBoard(expected=self.providers, may_idle=config.may_idle, now=time.monotonic())
        # The drain `moa serve` asked for on shutdown, which every ingress replica learns at its
        # next check-in; and what each live replica said last (requests in progress, state).
        self._drain: dict[str, Any] | None = None
        self._ingress = IngressRoster()
        self.receipts = Receipts()

    @classmethod
    def get_deployment_options(cls, config: HealthBoardConfig) -> dict[str, Any]:
        """Its Serve options from ``serve.health_board``. The ingress polls it every 0.5 s and each
        provider replica reports to it every 2 s: access lines for those calls would bury
        everything else in its log."""
        return {
            "name": HEALTH_BOARD_NAME,
            "logging_config": {"enable_access_log": False},
            **serve_options(config.deployment, default_max_ongoing=1000),
        }

    def report(
        self, provider: str, replica: str, snapshot: Mapping[str, Any], latencies: Mapping[str, float]
    ) -> None:
        self.board.report(provider, replica, snapshot, latencies, time.monotonic())

    async def receipt(self, call_id: str, used: Usage) -> None:
        """A provider replica's receipt for a call its caller cut (async: on the board's loop,
        where ``receipts`` waits for it)."""
        self.receipts.put(call_id, used)

    async def finished_receipts(self, receipts: Mapping[str, Usage]) -> None:
        """A provider replica's receipts of streamed calls that ended with their result, a few at
        a time: the ones whose caller had cut them as the result crossed are asked for."""
        self.receipts.put_finished(receipts)

    async def take_receipts(self, call_ids: Sequence[str], within_s: float) -> dict[str, Usage]:
        """An ingress replica's settlement asks for the receipts of the calls it cut; they are
        handed over (and forgotten here) as they arrive, for at most ``within_s`` seconds."""
        return await self.receipts.take(call_ids, within_s)

    def checkin(self, replica: str, state: Mapping[str, Any]) -> dict[str, Any]:
        """An ingress replica's periodic call: it says how it is doing (requests in progress,
        whether it drained) and gets the health view to route with and any drain asked for."""
        now = time.monotonic()
        self._ingress.checkin(replica, state, now)
        return {"view": self.board.view(now), "drain": self._drain}

    def drain(self, drain_s: float, hurry: bool = False) -> None:
        """Ask every ingress replica to drain (``moa serve`` does on SIGINT/SIGTERM)."""
        self._drain = {"drain_s": drain_s, "hurry": hurry}

    def drain_status(self) -> dict[str, dict[str, Any]]:
        """What each live ingress replica last said: ``in_flight``, ``drained``, ``cut``."""
        return self._ingress.live(time.monotonic())

    def health_view(self) -> HealthView:
        """What ingress replicas route with: which providers are unavailable, recent latencies."""
        return self.board.view(time.monotonic())

    def health(self) -> dict[str, dict[str, object]]:
        return self.board.summary(self.providers, time.monotonic())
