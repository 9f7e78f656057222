"""The aggregator deployment: fuses a layer's answers by calling the aggregator model (and its
fallback chain) through the provider deployments. It runs the engine's own fusion function."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from actors.handles import HandleCaller
from moa.config import parse_config
from moa.engine.fusion import FuseEvent, FuseJob, fuse


class AggregatorDeployment:
    def __init__(self, config: dict[str, Any], providers: Mapping[str, Any]) -> None:
        self.config = parse_config(config, "the deployed config")
        self.caller = HandleCaller(providers)

    async def fuse(self, job: FuseJob) -> AsyncIterator[FuseEvent]:
        async for ev in fuse(job, self.caller, self.config):
            yield ev
