"""The HTTP ingress: the OpenAI-compatible API, running the MoA engine over deployment handles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve

from actors.handles import HandleCaller, RemoteFuser, RemoteRouter
from actors.telemetry import init_replica_telemetry, shutdown_replica_telemetry
from moa.api.app import create_api
from moa.config import parse_config
from moa.engine.engine import MoAEngine


@serve.ingress()
class IngressDeployment:
    def __init__(
        self, config: dict[str, Any], providers: Mapping[str, Any], router: Any, aggregator: Any
    ) -> None:
        self.config = parse_config(config, "the deployed config")
        init_replica_telemetry(self.config)
        self.router = router
        engine = MoAEngine(
            self.config,
            HandleCaller(providers),
            router=RemoteRouter(router),
            fuser=RemoteFuser(aggregator),
        )
        self._asgi = create_api(self.config, engine, self._health)

    async def _health(self) -> dict[str, Any]:
        summary: dict[str, Any] = await self.router.health.remote()
        return summary

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi

    def __del__(self) -> None:
        shutdown_replica_telemetry()
