"""One Serve deployment per provider: each replica holds its SDK client, concurrency semaphore and
circuit breaker; the account's RPM/TPM budget is shared by all replicas through one limiter actor,
which each replica leases slices of."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import DeploymentActorConfig

from moa.config import (
    MoAConfig,
    ObservabilityConfig,
    ProviderConfig,
    SimulatorConfig,
    resolve_endpoint,
    simulation_active,
)
from moa.limits import LeasedRateBudget, ProviderLimits
from moa.providers.client import ProviderClient
from moa.providers.registry import build_client
from moa.types import CallRequest, CallResult, StreamEvent, Usage, batched
from moa_actors.handles import deployment_name
from moa_actors.health_board import HEALTH_BOARD_NAME
from moa_actors.limiter import LIMITER_NAME, LimiterAuthority, RateLimiterActor
from moa_actors.options import serve_options
from moa_actors.telemetry import init_replica_telemetry, shutdown_replica_telemetry
from moa_observability.genai import PROVIDER_NAMES
from moa_observability.metrics import ProviderMetrics
from moa_observability.tracing import extract, iterate_in

log = logging.getLogger("moa.actors.provider")

# How often a replica tells the health board its circuit state and latencies, besides on every change.
REPORT_INTERVAL_S = 2.0
# How long a replica gathers the receipts of the streamed calls that ended with their result
# before it sends them to the health board in one message: one message per call would make the
# board's one replica a bottleneck; a settlement waits for them far longer (``RECEIPT_WAIT_S``).
FINISHED_BATCH_S = 0.05


# The config sections a provider replica is bound with (``ProviderReplicaConfig``, besides the
# provider's name).
CONFIG_SECTIONS = ("providers", "simulator", "observability")


class ProviderReplicaConfig(BaseModel):
    """What a provider deployment is bound with: its provider's name and the sections of the config
    its replicas read, no more."""

    name: str = Field(description="The provider this deployment serves: a key of providers.")
    providers: dict[str, ProviderConfig] = Field(
        description="Every provider's entry, not only its own: whether calls go to the simulator "
        "depends on whether any provider's key is in the environment (simulation_active), which each "
        "replica reads where it runs."
    )
    simulator: SimulatorConfig = Field(description="The config's simulator section.")
    observability: ObservabilityConfig = Field(description="The config's observability section.")

    @classmethod
    def of(cls, cfg: MoAConfig, name: str) -> ProviderReplicaConfig:
        return cls(name=name, **{section: getattr(cfg, section) for section in CONFIG_SECTIONS})

    @property
    def provider(self) -> ProviderConfig:
        return self.providers[self.name]

    def sections(self) -> MoAConfig:
        """These sections as a config (the rest at its defaults), for the core's functions that
        take one: ``simulation_active``, ``resolve_endpoint``."""
        return MoAConfig(providers=self.providers, simulator=self.simulator, observability=self.observability)


class ProviderDeployment:
    """Serves ``call`` and ``stream`` for one provider's models."""

    @classmethod
    def get_deployment_options(cls, config: ProviderReplicaConfig) -> dict[str, Any]:
        """Its Serve options from its provider's entry: ``deployment`` (by default twice the
        provider's concurrency in requests per replica) and, when the provider has an RPM or TPM
        budget, the one limiter actor its replicas share."""
        pcfg = config.provider
        actors = []
        if pcfg.limits.rpm or pcfg.limits.tpm:
            actors.append(
                DeploymentActorConfig(
                    name=LIMITER_NAME,
                    actor_class=RateLimiterActor,
                    init_kwargs={
                        "rpm": pcfg.limits.rpm,
                        "tpm": pcfg.limits.tpm,
                        "reserve": pcfg.limits.interactive_reserve,
                    },
                    actor_options={"num_cpus": 0.01},
                )
            )
        return {
            "name": deployment_name(config.name),
            "deployment_actors": actors,
            **serve_options(pcfg.deployment, default_max_ongoing=2 * pcfg.limits.concurrency),
        }

    async def __init__(self, config: ProviderReplicaConfig, simulator: Any = None) -> None:
        self.config = config
        self.identity = init_replica_telemetry(config.observability)
        self.provider = provider = config.name
        pcfg = config.provider
        sections = config.sections()
        sim_url = config.simulator.url
        if simulation_active(sections) and not sim_url and simulator is not None:
            sim_url = await simulator.url.remote()
        endpoint = resolve_endpoint(sections, provider, sim_url=sim_url)
        budget = None
        if pcfg.limits.rpm or pcfg.limits.tpm:
            authority = LimiterAuthority(lambda: serve.get_deployment_actor(LIMITER_NAME))
            budget = LeasedRateBudget(authority, pcfg.limits.rpm, pcfg.limits.tpm)
        self.client: ProviderClient = build_client(
            provider,
            pcfg,
            endpoint,
            ProviderLimits.from_config(pcfg, budget),
            capture_content=config.observability.capture_content,
        )
        self.metrics = ProviderMetrics()
        self.metric_name = PROVIDER_NAMES.get(pcfg.kind.value, provider)
        self.app_name = self.identity["ray.serve.app"] or "default"
        self._board: Any = None
        self._receipts: set[asyncio.Task[None]] = set()  # on their way to the health board
        self._finished: dict[str, Usage] = {}  # results' receipts, gathered for the next message
        self._latency: dict[str, float] = {}
        self._last_state: str | None = None
        self.answered = 0  # calls this replica answered (for operators and the cluster tests)
        self._reporter = asyncio.create_task(self._report_loop())

    async def call(self, req: CallRequest, trace: Mapping[str, str] | None = None) -> CallResult:
        token = otel_context.attach(extract(trace))
        try:
            result = await self.client.complete(req)
        finally:
            otel_context.detach(token)
        self._observe(result)
        return result

    async def stream(
        self, req: CallRequest, trace: Mapping[str, str] | None = None
    ) -> AsyncIterator[StreamEvent]:
        """The call's stream; its text in batches when nobody reads it as it comes (``batch_s``):
        every message back to the ingress is an object-store round trip, and a token each would
        cost the ingress's CPU far more than the call itself.

        If the caller cuts the stream, this replica has seen text the caller had not (a batch held
        here, what the provider wrote while the cancellation crossed): it leaves a receipt of what
        the call consumed on the health board, for the caller's ledger (``moa.engine.receipts``).
        A call that ends with its result leaves one too, its provider's usage: the caller may have
        cut it as the result crossed, and then only this receipt says what the call cost."""
        source = self.client.stream(req, on_cut=lambda used: self._receipt(req.call_id, used))
        traced = iterate_in(extract(trace), source)
        events: AsyncIterator[StreamEvent] = traced
        if req.batch_s is not None:
            events = batched(events, req.batch_s)
        try:
            async for ev in events:
                if isinstance(ev, CallResult):
                    self._observe(ev)
                    self._finished_receipt(req.call_id, ev.usage)
                yield ev
        finally:
            # Cancelled while its text waited to be taken, the call is closed now, not when it is
            # collected: its provider stops writing, and billing, at once.
            await traced.aclose()

    async def health(self) -> dict[str, Any]:
        return {
            "replica": self.identity["ray.serve.replica_id"],
            "node_id": self.identity["ray.node_id"],
            "answered": self.answered,
            **self.client.health(),
        }

    # -- reporting --------------------------------------------------------------------------------

    def _observe(self, result: CallResult) -> None:
        self.metrics.record(result, self.metric_name)
        self.answered += result.ok
        if result.ok:
            self._latency[result.requested_model] = result.latency_s
        state = str(self.client.health().get("state"))
        if state != self._last_state:
            self._last_state = state
            asyncio.get_running_loop().create_task(self._report())

    def _health_board(self) -> Any:
        if self._board is None:
            self._board = serve.get_deployment_handle(HEALTH_BOARD_NAME, app_name=self.app_name)
        return self._board

    async def _report(self) -> None:
        # The breaker's gauge first, every time: a board that does not answer must not freeze it.
        self.metrics.circuit_state(self.provider, str(self.client.health().get("state")))
        try:
            latencies, self._latency = self._latency, {}
            replica = self.identity["ray.serve.replica_id"]
            await self._health_board().report.remote(self.provider, replica, self.client.health(), latencies)
        except Exception as exc:  # the health board may be restarting; the next report will do
            log.debug("health report failed: %s", type(exc).__name__)

    def _receipt(self, call_id: str, used: Usage) -> None:
        """Send a cut call's receipt to the health board, without waiting: it is called as the
        call's stream closes, from a task being cancelled. In a context of its own: sent within
        the cancelled request's, Serve would cancel it with the request."""
        send = self._send_receipt(call_id, used)
        task = asyncio.get_running_loop().create_task(send, context=contextvars.Context())
        self._receipts.add(task)  # held until sent: the loop keeps only weak references
        task.add_done_callback(self._receipts.discard)

    async def _send_receipt(self, call_id: str, used: Usage) -> None:
        try:
            await self._health_board().receipt.remote(call_id, used)
        except Exception as exc:  # lost: the ledger keeps the caller's estimate for that call
            log.debug("receipt not sent: %s", type(exc).__name__)

    def _finished_receipt(self, call_id: str, used: Usage) -> None:
        """Gather a streamed call's result's receipt for the health board: sent with the others
        that end within ``FINISHED_BATCH_S``, in a context of its own (as ``_receipt``)."""
        self._finished[call_id] = used
        if len(self._finished) == 1:
            task = asyncio.get_running_loop().create_task(
                self._send_finished(), context=contextvars.Context()
            )
            self._receipts.add(task)
            task.add_done_callback(self._receipts.discard)

    async def _send_finished(self) -> None:
        await asyncio.sleep(FINISHED_BATCH_S)
        batch, self._finished = self._finished, {}
        try:
            await self._health_board().finished_receipts.remote(batch)
        except Exception as exc:  # lost: a call cut as its result crossed keeps its estimate
            log.debug("receipts not sent: %s", type(exc).__name__)

    async def _report_loop(self) -> None:
        while True:
            await self._report()
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self.client.aclose()
        shutdown_replica_telemetry()
