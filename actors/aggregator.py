"""The aggregator deployment: fuses a layer's answers by calling the aggregator model (and its
fallback chain) through the provider deployments. It runs the engine's own fusion function."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from moa.config import MoAConfig
from moa.engine.fusion import FuseEvent, FuseJob, fuse
from moa_actors.handles import HandleCaller
from moa_actors.options import serve_options
from moa_actors.telemetry import init_replica_telemetry, shutdown_replica_telemetry
from moa_observability.tracing import extract, iterate_in


class AggregatorDeployment:
    """Bound with the whole config, its own: the fusion reads the templates, the providers' kinds
    and prices and the caps, as the engine in the ingress does; and the provider deployments'
    handles."""

    @classmethod
    def get_deployment_options(cls, config: MoAConfig) -> dict[str, Any]:
        """Its Serve options from ``serve.aggregator``."""
        return {"name": "aggregator", **serve_options(config.serve.aggregator, default_max_ongoing=1000)}

    def __init__(self, config: MoAConfig, providers: Mapping[str, Any]) -> None:
        self.config = config
        init_replica_telemetry(self.config.observability)
        self.caller = HandleCaller(providers)

    async def fuse(self, job: FuseJob, trace: Mapping[str, str] | None = None) -> AsyncIterator[FuseEvent]:
        async for ev in iterate_in(extract(trace), fuse(job, self.caller, self.config)):
            yield ev

    def __del__(self) -> None:
        shutdown_replica_telemetry()
